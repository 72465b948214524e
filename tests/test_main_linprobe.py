"""main_linprobe.py: the linear probe trains its head alone and leaves the encoder bit for bit."""
import torch
from torch import nn

import main_linprobe
import test_main_classification
from test_main_classification import cls_argv, load, run
from test_pretrained import DIM

pretrained = test_main_classification.pretrained  # the fixture, by name (module-scoped: built once here)


def test_linear_probe_step_leaves_the_encoder_bit_for_bit(tiny_data, tmp_path, pretrained, monkeypatch):
    built = {}

    def spy(args):
        model = build(args)
        built['model'], built['init'] = model, {k: v.clone() for k, v in model.state_dict().items()}
        return model
    build = main_linprobe.build_model
    monkeypatch.setattr(main_linprobe, 'build_model', spy)
    out = tmp_path / 'linprobe'
    run(main_linprobe, cls_argv(tiny_data, out, '--finetune', pretrained, '--blr', '50'))

    head = built['model'].head
    assert isinstance(head, nn.Sequential) and len(head) == 2
    assert isinstance(head[0], nn.BatchNorm1d) and not head[0].affine and isinstance(head[1], nn.Linear)
    assert (head[1].in_features, head[1].out_features) == (DIM, 4)
    for name, p in built['model'].named_parameters():
        assert p.requires_grad == name.startswith('head.'), name

    ckpt = load(out / 'checkpoint-last.pth')
    assert ckpt['kind'] == 'linprobe' and ckpt['epoch'] == 0
    state = ckpt['model']
    encoder_ckpt = {k: v for k, v in load(pretrained)['model'].items() if not k.startswith(('decoder', 'mask_token'))}
    encoder = {k: v for k, v in state.items() if not k.startswith('head.')}
    assert set(encoder) == set(encoder_ckpt)  # class-token probe: cls_token, pos_embed, patch_embed, blocks, norm
    for key, value in encoder.items():
        assert torch.equal(value, encoder_ckpt[key]), key
    assert set(state) - set(encoder) == {'head.0.running_mean', 'head.0.running_var', 'head.0.num_batches_tracked',
                                         'head.1.weight', 'head.1.bias'}
    assert not torch.equal(state['head.1.weight'], built['init']['head.1.weight'])
    assert not torch.equal(state['head.1.bias'], built['init']['head.1.bias'])
    assert int(state['head.0.num_batches_tracked']) == 4  # 32 images / batch 8, one epoch
    assert not torch.equal(state['head.0.running_mean'], built['init']['head.0.running_mean'])
    # the optimizer only ever held the head's weight and bias
    assert sum(len(g['params']) for g in ckpt['optimizer']['param_groups']) == 2
