"""util/lr_decay.py: layer-wise lr decay groups of the fine-tuning optimizer."""
import argparse

import pytest
import torch

import main_finetune
import models_vit
from test_pretrained import DEPTH
from util.lr_decay import param_groups_layer_decay
from util.lr_sched import set_lr


def expected_lr_scale(name, decay=0.65):
    if name in ('cls_token', 'pos_embed') or name.startswith('patch_embed.'):
        return decay ** (DEPTH + 1)
    if name.startswith('blocks.'):
        return decay ** (DEPTH - int(name.split('.')[1]))
    assert name.startswith(('norm.', 'fc_norm.', 'head.')), name
    return 1.0


@pytest.mark.parametrize('global_pool', [False, True], ids=['cls_token', 'global_pool'])
def test_layer_decay_groups(global_pool):
    model = models_vit.create_model('vit_tiny_patch8', 32, 4, global_pool=global_pool)
    args = argparse.Namespace(weight_decay=0.05, layer_decay=0.65, lr=1e-3)
    optimizer = main_finetune.build_optimizer(args, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []
    for group in optimizer.param_groups:
        for p in group['params']:
            name = names[id(p)]
            seen.append(name)
            assert group['lr_scale'] == pytest.approx(expected_lr_scale(name), rel=1e-12), name
            # decay on matrices only: none on biases, norms, the class token and the position table
            decays = name.endswith('.weight') and 'norm' not in name
            assert group['weight_decay'] == (0.05 if decays else 0.0), name
    assert sorted(seen) == sorted(n for n, _ in model.named_parameters())  # each parameter exactly once
    # spot checks of the formula
    scale = {names[id(p)]: g['lr_scale'] for g in optimizer.param_groups for p in g['params']}
    assert scale['patch_embed.proj.weight'] == pytest.approx(0.65 ** 5)
    assert scale['blocks.0.attn.qkv.weight'] == pytest.approx(0.65 ** 4)
    assert scale['blocks.3.mlp.fc2.bias'] == pytest.approx(0.65)
    assert scale['head.weight'] == 1.0

    set_lr(optimizer, 2e-3)
    for group in optimizer.param_groups:
        assert group['lr'] == pytest.approx(2e-3 * group['lr_scale'], rel=1e-12)
    assert {round(g['lr'] / 2e-3, 12) for g in optimizer.param_groups} == \
        {round(0.65 ** k, 12) for k in range(DEPTH + 2)}


def test_layer_decay_skips_frozen_parameters():
    model = models_vit.create_model('vit_tiny_patch8', 32, 4, global_pool=False)
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    groups = param_groups_layer_decay(model, 0.05, 0.65)
    assert sorted(len(g['params']) for g in groups) == [1, 1]
    assert all(g['lr_scale'] == 1.0 for g in groups)
