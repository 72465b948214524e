"""The fast paths keep the numbers: compiled blocks and bf16 autocast against plain eager fp32 on the same
weights, inputs and masks."""
import copy

import pytest
import torch

from models_milan import create_model, masking_order
from models_clip import build_random_teacher
from util.precision import autocast


def setup(prompting=True):
    torch.manual_seed(0)
    model = create_model('mae_vit_tiny_patch8', img_size=32, target='clip', target_dim=64,
                         prompting_decoder=prompting)
    teacher = build_random_teacher(8, 4)
    images = torch.randn(4, 3, 32, 32)
    targets, importance = teacher(images)
    ids = masking_order(4, 16, 'cpu', importance)
    return model, images, targets, ids


def loss_and_grads(model, images, targets, ids, precision='fp32'):
    model.zero_grad()
    with autocast(precision, torch.device('cpu')):
        loss, _, _ = model(images, targets, ids_shuffle=ids)
    loss.backward()
    return loss.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_blocks_match_eager():
    model, images, targets, ids = setup()
    eager_loss, eager_grads = loss_and_grads(model, images, targets, ids)
    compiled = copy.deepcopy(model)
    for block in list(compiled.blocks) + list(compiled.decoder_blocks):
        block.compile()
    loss, grads = loss_and_grads(compiled, images, targets, ids)
    assert loss.item() == pytest.approx(eager_loss.item(), abs=1e-5)
    for name, grad in grads.items():
        assert torch.allclose(grad, eager_grads[name], rtol=1e-4, atol=1e-6), name
    assert set(compiled.state_dict()) == set(model.state_dict())  # checkpoints keep their keys


@pytest.mark.parametrize('prompting', [True, False])
def test_bf16_autocast_matches_fp32(prompting):
    model, images, targets, ids = setup(prompting)
    loss32, grads32 = loss_and_grads(model, images, targets, ids)
    loss16, grads16 = loss_and_grads(model, images, targets, ids, 'bf16')
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)
    flat32 = torch.cat([g.flatten() for g in grads32.values()])
    flat16 = torch.cat([grads16[n].flatten() for n in grads32])
    assert torch.nn.functional.cosine_similarity(flat32, flat16, dim=0) > 0.99
