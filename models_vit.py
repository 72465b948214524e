"""ViTs for fine-tuning and linear probing, built on timm's VisionTransformer so that parameter names match
MAE/MILAN pretraining checkpoints (patch_embed, cls_token, pos_embed, blocks.N, norm) and our fine-tuned
weights load in timm."""
from functools import partial

import torch
import torch.nn as nn
from timm.layers import DropPath as TimmDropPath
from timm.models.vision_transformer import VisionTransformer

# Same sizes as models_milan.MODELS, without the decoder.
MODELS = {
    'vit_tiny_patch8': dict(patch_size=8, embed_dim=192, depth=4, num_heads=3),
    'vit_small_patch16': dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    'vit_base_patch16': dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    'vit_large_patch16': dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    'vit_huge_patch14': dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}


class DropPath(nn.Module):
    """Stochastic depth (timm's law: each sample's branch kept with probability 1 - rate, scaled by 1 / (1 -
    rate)) whose rate is a tensor, not a Python number. torch.compile treats a block's Python numbers as
    constants, so timm's per-block rates would need one compiled graph per block: more than Dynamo's limit
    of 8 for ViT-B and larger, after which the remaining blocks silently run uncompiled."""

    def __init__(self, rate):
        super().__init__()
        self.register_buffer('rate', torch.tensor(float(rate)), persistent=False)

    def forward(self, x):
        if not self.training:
            return x
        keep = 1 - self.rate
        kept = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) < keep
        return x * (kept / keep.clamp_min(1e-12)).to(x.dtype)  # rate 1 drops every sample, no 0 / 0


def create_model(name, img_size=224, num_classes=1000, global_pool=True, drop_path=0.0):
    """global_pool=True: average of the patch tokens through a LayerNorm (`fc_norm`) into the head, MAE's
    fine-tuning setting; False: the final-normed class token (linear probing). Drop-path rates rise linearly
    over the blocks from 0 to `drop_path`, as in timm, in a form that one compiled graph serves."""
    model = VisionTransformer(img_size=img_size, num_classes=num_classes, global_pool='avg' if global_pool else 'token',
                              mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                              drop_path_rate=drop_path, **MODELS[name])
    if drop_path > 0:
        for block in model.blocks:
            rate = block.drop_path1.drop_prob if isinstance(block.drop_path1, TimmDropPath) else 0.0
            block.drop_path1, block.drop_path2 = DropPath(rate), DropPath(rate)
    return model
