"""The frozen CLIP teacher: OpenAI's CLIP ViT image encoder, giving MILAN's targets and patch importance.

We reimplement the visual tower instead of calling openai-clip's, because its forward returns only the
class token, and MILAN needs every token's projected feature plus the class-token attention row of the
last block. Our forward produces both in one pass with fused attention; parameter names match OpenAI's
`visual.*` keys (minus the prefix), so OpenAI's checkpoints load into it unchanged. Finding, downloading and
reading those checkpoints is util/clip_weights.py's.
"""
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from util.clip_weights import clip_visual_weights
from util.data import CLIP_MEAN, CLIP_STD
from util.errors import UserError


class QuickGELU(nn.Module):
    """The GELU approximation CLIP was trained with; the exact GELU would shift the features."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names, batch-first."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, cls_attention=False):
        """Returns the attention output and, if asked, the class-token query's head-averaged
        attention probabilities over all keys [B, N] (float32), computed from that one row only."""
        B, N, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))
        if not cls_attention:
            return out, None
        # Elementwise product and sum rather than matmul, so autocast cannot lower it to half precision.
        logits = (q[:, :, :1].float() * k.float()).sum(-1) * q.shape[-1] ** -0.5  # [B, heads, N]
        return out, logits.softmax(-1).mean(1)


class ResidualAttentionBlock(nn.Module):
    """CLIP's pre-norm transformer block."""

    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ('c_fc', nn.Linear(width, 4 * width)),
            ('gelu', QuickGELU()),
            ('c_proj', nn.Linear(4 * width, width)),
        ]))

    def forward(self, x, cls_attention=False):
        h, attn = self.attn(self.ln_1(x), cls_attention)
        x = x + h
        return x + self.mlp(self.ln_2(x)), attn


class ClipTeacher(nn.Module):
    """OpenAI CLIP's visual ViT, frozen; forward gives (per-token targets, class-token attention to patches)."""

    def __init__(self, width, layers, patch_size, grid_size, output_dim, average_targets=1):
        super().__init__()
        if width % 64:
            raise ValueError(f'CLIP ViT width must be a multiple of 64 (heads = width // 64), got {width}')
        if not 1 <= average_targets <= layers:
            raise UserError(f'--average_targets {average_targets} is out of range; '
                            f'the teacher has {layers} blocks, pick 1..{layers}')
        self.patch_size = patch_size
        self.grid_size = grid_size
        self.input_size = patch_size * grid_size
        self.output_dim = output_dim
        self.mean, self.std = CLIP_MEAN, CLIP_STD  # the statistics it was trained with
        self.average_targets = average_targets

        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid_size ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleDict(
            {'resblocks': nn.ModuleList(ResidualAttentionBlock(width, width // 64) for _ in range(layers))})
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

        # OpenAI's init scales, so a randomly initialised teacher (CPU demo) behaves like a real one.
        proj_std = scale * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=scale)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

        self.requires_grad_(False)
        self.train(False)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, which --compile compiles one by one."""
        return self.transformer.resblocks

    def train(self, mode=True):
        """The teacher never trains: stays in eval mode whatever the caller's model.train() says."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, S, S], normalised -> targets [B, 1+L, output_dim], importance [B, L] float32."""
        if tuple(images.shape[-2:]) != (self.input_size, self.input_size):
            raise UserError(f'the CLIP teacher takes {self.input_size}x{self.input_size} images but got '
                            f'{images.shape[-2]}x{images.shape[-1]}; set --input_size {self.input_size}')
        x = self.conv1(images.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # [B, L, D]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype))

        blocks = self.transformer.resblocks
        kept = []
        for i, block in enumerate(blocks):
            x, importance = block(x, cls_attention=i == len(blocks) - 1)
            if i >= len(blocks) - self.average_targets:
                kept.append(x)
        if len(kept) == 1:
            x = self.ln_post(x)
        else:
            x = self.ln_post(torch.stack([self.ln_post(t) for t in kept]).mean(0))
        return x @ self.proj, importance[:, 1:]


def build_random_teacher(patch_size: int, grid_size: int, width: int = 64, layers: int = 2, output_dim: int = 64,
                         average_targets: int = 1, seed: int = 0) -> ClipTeacher:
    """A randomly initialised teacher for runs without CLIP weights (CPU demo, tests); leaves the global RNG alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ClipTeacher(width, layers, patch_size, grid_size, output_dim, average_targets)


def _teacher_from_state_dict(sd, path, average_targets=1):
    """Build a ClipTeacher whose shape is read off the (stripped, visual) tensors and load them strictly."""
    width, _, patch_size, _ = sd['conv1.weight'].shape
    layers = sum(k.startswith('transformer.resblocks.') and k.endswith('.attn.in_proj_weight') for k in sd)
    tokens = sd['positional_embedding'].shape[0]
    grid_size = round((tokens - 1) ** 0.5)
    if grid_size ** 2 + 1 != tokens or width % 64 or layers == 0:
        raise UserError(f'{path} does not look like an OpenAI CLIP ViT (width {width}, {layers} blocks, '
                        f'{tokens} position slots); pass OpenAI\'s CLIP .pt file or a CLIP state-dict file')
    teacher = ClipTeacher(width, layers, patch_size, grid_size, sd['proj'].shape[1], average_targets)
    expected = set(teacher.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise UserError(f'{path} does not match a CLIP ViT visual tower (missing: {", ".join(missing[:5]) or "-"}; '
                        f'unexpected: {", ".join(unexpected[:5]) or "-"}); pass an unmodified CLIP checkpoint')
    try:
        teacher.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise UserError(f'{path} has tensors of unexpected shapes for a CLIP ViT '
                        f'({str(e).strip().splitlines()[-1].strip()}); pass an unmodified CLIP checkpoint') from e
    return teacher


def load_clip_teacher(name_or_path: str, cache_dir: str, average_targets: int = 1) -> ClipTeacher:
    """A frozen fp32 teacher on CPU from an OpenAI model name (downloaded into cache_dir) or a local file."""
    sd, path = clip_visual_weights(name_or_path, cache_dir)
    return _teacher_from_state_dict(sd, path, average_targets)
