"""models_vit.py: the classifiers' sizes, stochastic depth as timm's in one compiled graph, and our weights in timm."""
import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import models_vit
import test_main_classification
from models_milan import MODELS as PRETRAIN_MODELS
from test_main_classification import load
from test_pretrained import DEPTH

# the fixtures, by name (module-scoped: built once here); finetuned starts from pretrained
finetuned, pretrained = test_main_classification.finetuned, test_main_classification.pretrained


def test_sizes_are_the_pretraining_encoders():
    assert models_vit.MODELS['vit_base_patch16'] == dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    assert sorted(models_vit.MODELS) == sorted(name.removeprefix('mae_') for name in PRETRAIN_MODELS)


def test_drop_path_rates_rise_linearly_as_in_timm():
    model = models_vit.create_model('vit_base_patch16', drop_path=0.1)
    rates = [float(block.drop_path1.rate) for block in model.blocks]
    assert rates == pytest.approx([0.1 * i / 11 for i in range(12)])
    assert all(float(b.drop_path2.rate) == float(b.drop_path1.rate) for b in model.blocks)
    reference = VisionTransformer(embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.1, global_pool='avg')
    assert set(model.state_dict()) == set(reference.state_dict())  # the rates are not saved


def test_drop_path_keeps_each_sample_with_one_minus_rate_and_rescales():
    drop = models_vit.DropPath(0.25)
    x = torch.ones(20000, 3, 2)
    torch.manual_seed(0)
    out = drop(x)
    per_sample = out[:, 0, 0]
    assert torch.equal(per_sample.unique(), torch.tensor([0.0, 1 / 0.75]))
    assert (out == per_sample[:, None, None]).all()  # the whole sample's branch, not single elements
    assert (per_sample > 0).float().mean().item() == pytest.approx(0.75, abs=0.01)
    drop.eval()
    assert torch.equal(drop(x), x)


def test_compiled_blocks_with_different_rates_share_one_graph():
    """timm's float rates are constants to torch.compile: a graph per block, past Dynamo's limit of 8 for
    ViT-B (whose remaining blocks then run uncompiled)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = models_vit.create_model('vit_tiny_patch8', img_size=32, num_classes=4, drop_path=0.1)
    for block in model.blocks:
        block.compile(dynamic=False)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert counters['stats']['unique_graphs'] == 1


def test_finetuned_weights_load_strictly_into_timm(finetuned):
    """timm's own vit_tiny recipe, resized (8px patches, 4 blocks, 32px input) with global_pool='avg'."""
    state = load(finetuned / 'checkpoint-best.pth')['model']
    reference = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=8, depth=DEPTH,
                                  num_classes=4, global_pool='avg')
    untrained = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=8, depth=DEPTH,
                                  num_classes=4, global_pool='avg')
    reference.load_state_dict(state, strict=True)
    ours = models_vit.create_model('vit_tiny_patch8', 32, 4, global_pool=True)
    ours.load_state_dict(state, strict=True)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = reference.eval()(x)
        assert torch.equal(logits, ours.eval()(x))
        assert not torch.allclose(logits, untrained.eval()(x))  # the weights really came from the file
