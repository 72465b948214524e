"""util/optim.py: the weight-decay parameter groups and the fused AdamW."""
import torch

from models_milan import create_model
from util.optim import adamw, param_groups_weight_decay


def test_weight_decay_groups():
    model = create_model('mae_vit_tiny_patch8', img_size=32, target='clip', target_dim=16, prompting_decoder=True)
    no_decay, decay = param_groups_weight_decay(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay['params']}
    decay_names = {names[id(p)] for p in decay['params']}
    assert no_decay['weight_decay'] == 0 and decay['weight_decay'] == 0.05
    assert {'cls_token', 'mask_token', 'blocks.0.attn.qkv.bias', 'blocks.0.norm1.weight', 'norm.bias',
            'decoder_blocks.0.attn.q.bias'} <= no_decay_names
    assert {'blocks.0.attn.qkv.weight', 'patch_embed.proj.weight', 'decoder_blocks.0.attn.kv.weight',
            'decoder_pred.weight'} <= decay_names
    assert not any('pos_embed' in n for n in no_decay_names | decay_names)  # fixed, never optimised
    assert len(no_decay_names) + len(decay_names) == len(list(model.parameters()))


def test_fused_adamw_matches_the_reference_update():
    """Our AdamW (fused, as on the GPU) takes the same steps as PyTorch's plain per-tensor AdamW on the same
    groups: decayed weights and the exempt biases, norms and tokens."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(create_model('mae_vit_tiny_patch8', img_size=32, target='pixel'))
    fused = adamw(param_groups_weight_decay(models[0], 0.05), 1e-2, (0.9, 0.95), torch.device('cpu'))
    reference = torch.optim.AdamW(param_groups_weight_decay(models[1], 0.05), lr=1e-2, betas=(0.9, 0.95),
                                  foreach=False, fused=False)
    assert fused.defaults['fused']
    torch.manual_seed(1)
    for _ in range(3):  # the same gradients for both, several steps so the moments matter
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        fused.step()
        reference.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
