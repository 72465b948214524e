"""ViTs for fine-tuning and linear probing, built on timm's VisionTransformer so that parameter names match
MAE/MILAN pretraining checkpoints (patch_embed, cls_token, pos_embed, blocks.N, norm) and our fine-tuned
weights load in timm."""
from functools import partial

import torch
import torch.nn as nn
from timm.layers import DropPath as TimmDropPath
from timm.models.vision_transformer import VisionTransformer

from models_milan import MODELS as PRETRAIN_MODELS

# The pretraining encoders' sizes (models_milan.MODELS, one table), without the decoder: mae_vit_base_patch16's
# encoder is fine-tuned as vit_base_patch16.
ENCODER = ('patch_size', 'embed_dim', 'depth', 'num_heads')
MODELS = {name.removeprefix('mae_'): {k: size[k] for k in ENCODER} for name, size in PRETRAIN_MODELS.items()}


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


def create_model(name: str, img_size: int = 224, num_classes: int = 1000, global_pool: bool = True,
                 drop_path: float = 0.0) -> VisionTransformer:
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
