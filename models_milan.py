"""MILAN pretraining models: an MAE-style ViT encoder on the visible patches, the MAE decoder or the
prompting decoder, the CLIP-feature or pixel reconstruction loss (SPEC sections 2-4), and the loss of a batch
with the teacher's view of it. The teacher's architecture is models_clip's."""
from functools import partial
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block, PatchEmbed

from util.data import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, renormalize
from util.pos_embed import sincos_2d

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def teacher_view(images: torch.Tensor, teacher_input_norm: str, teacher: Optional[nn.Module] = None) -> torch.Tensor:
    """The teacher sees the student's (ImageNet-normalised) batch: as released by default ('imagenet'), with CLIP's
    statistics ('clip') or with those the teacher was trained with ('teacher': its `mean` and `std`); resized
    (bicubic, antialiased) to the teacher's `input_size` when that differs (--teacher_input_size)."""
    if teacher is not None and images.shape[-1] != teacher.input_size:
        images = F.interpolate(images, size=(teacher.input_size, teacher.input_size), mode='bicubic',
                               align_corners=False, antialias=True)
    if teacher_input_norm == 'clip':
        return renormalize(images, IMAGENET_MEAN, IMAGENET_STD, CLIP_MEAN, CLIP_STD)
    if teacher_input_norm == 'teacher':
        return renormalize(images, IMAGENET_MEAN, IMAGENET_STD, teacher.mean, teacher.std)
    return images


def masking_order(batch: int, num_patches: int, device: torch.device,
                  importance: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A permutation of the patches per image; the first ones stay visible.

    Random masking draws a uniform permutation. Semantic-aware masking draws patches without replacement
    with probability proportional to `importance` (the law of `torch.multinomial(A, L, replacement=False)`),
    sampled in one batched op as Gumbel top-k on log A.
    """
    if importance is None:
        scores = torch.rand(batch, num_patches, device=device)
    else:
        uniform = torch.rand(batch, num_patches, device=device).clamp_(1e-20, 1.0)
        gumbel = -torch.log(-torch.log(uniform))
        scores = importance.float().clamp_min(1e-30).log() + gumbel
    return scores.argsort(dim=1, descending=True)


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, L, p*p*3] flattened as (row-in-patch, column-in-patch, channel), MAE's order."""
    b, c, h, w = imgs.shape
    gh, gw = h // patch_size, w // patch_size
    x = imgs.reshape(b, c, gh, patch_size, gw, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, patch_size * patch_size * c)


def clip_token_losses(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(pred, target) of every token: [B, N]."""
    pred = F.normalize(pred.float(), dim=-1)
    target = F.normalize(target.float(), dim=-1)
    return 2 - 2 * (pred * target).sum(dim=-1)


def clip_feature_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over every token of every image (class, visible and masked) of 2 - 2 cos(pred, target)."""
    return clip_token_losses(pred, target).mean()


def pixel_patch_losses(pred: torch.Tensor, target: torch.Tensor, norm_pix_loss: bool) -> torch.Tensor:
    """Mean squared error of every patch: [B, L]; with norm_pix_loss each target patch is normalised by its
    own mean and unbiased variance."""
    target = target.float()
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    return ((pred.float() - target) ** 2).mean(dim=-1)


def pixel_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool) -> torch.Tensor:
    """Per-patch mean squared error averaged over the masked patches (mask: 1 = masked)."""
    return (pixel_patch_losses(pred, target, norm_pix_loss) * mask).sum() / mask.sum()


def block_cls_attention(block: Block, x: torch.Tensor) -> torch.Tensor:
    """[B, N] head-averaged attention probabilities of the class-token query over all N keys in a timm
    `Block` whose input is `x`, from that one query row (the block's own norm, qkv and q/k norms)."""
    attn = block.attn
    b, n, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    logits = (q[:, :, :1].float() @ k.float().transpose(-2, -1))[:, :, 0] * attn.scale  # [B, heads, N]
    return logits.softmax(-1).mean(1)


class PromptAttention(nn.Module):
    """Attention whose queries are the mask tokens and whose keys/values are the whole sequence."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, nq, d = queries.shape
        h = self.num_heads
        q = self.q(queries).reshape(b, nq, h, d // h).transpose(1, 2)
        k, v = self.kv(context).reshape(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, nq, d))


class PromptingBlock(nn.Module):
    """Prompting-decoder block: only the mask tokens `m` are updated; the fixed tokens `f` (class and
    visible) are prompts that enter the keys/values without LayerNorm1 and are never rewritten."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = PromptAttention(dim, num_heads)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, fixed: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        h = self.norm1(m)
        # Attention does not depend on the order of the keys, so [f ; LN1(m)] needs no reordering.
        m = m + self.attn(h, torch.cat([fixed, h], dim=1))
        return m + self.mlp(self.norm2(m))


class MilanViT(nn.Module):
    """Masked-image-modelling ViT: encoder on class + visible patches, a decoder over all tokens.

    target='clip' predicts the teacher's per-token CLIP features (all 1+L tokens count in the loss);
    target='pixel' is the MAE baseline (masked patches only). prompting_decoder selects MILAN's decoder.
    """

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                 target='clip', target_dim=512, prompting_decoder=False, norm_pix_loss=False):
        super().__init__()
        if target not in ('clip', 'pixel'):
            raise ValueError(f"target must be 'clip' or 'pixel', got {target!r}")
        self.patch_size = patch_size
        self.target = target
        self.prompting_decoder = prompting_decoder
        self.norm_pix_loss = norm_pix_loss

        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.grid_size = self.patch_embed.grid_size[0]
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer('pos_embed', sincos_2d(embed_dim, self.grid_size)[None])
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm) for _ in range(depth))
        self.norm = LayerNorm(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer('decoder_pos_embed', sincos_2d(decoder_embed_dim, self.grid_size)[None])
        if prompting_decoder:
            self.decoder_blocks = nn.ModuleList(
                PromptingBlock(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth))
        else:
            self.decoder_blocks = nn.ModuleList(
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
                for _ in range(decoder_depth))
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        out_dim = target_dim if target == 'clip' else patch_size ** 2 * 3
        self.decoder_pred = nn.Linear(decoder_embed_dim, out_dim)
        self.num_patches = num_patches
        self._init_weights()

    def _init_weights(self):
        """MAE's initialisation: xavier-uniform linears (patch embedding as a linear), small-normal tokens."""
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set:
        """Tokens are exempt from weight decay (position embeddings are fixed buffers, never optimised)."""
        return {'cls_token', 'mask_token'}

    def num_visible(self, mask_ratio: float) -> int:
        return int(self.num_patches * (1 - mask_ratio))

    def embed_patches(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """The patch embedding (plus position) of the patches `ids_keep` [B, K] only: the convolution applied
        as a linear map to those patches' pixels, so at 75% masking a quarter of the work, forward and
        backward, and a quarter of the saved activations. Same weights, same numbers as the conv."""
        b, c, h, w = imgs.shape
        p, g = self.patch_size, self.grid_size
        if (h, w) != (g * p, g * p):
            raise ValueError(f'the model takes {g * p}x{g * p} images, got {h}x{w}')
        pixels = imgs.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)
        pixels = torch.gather(pixels, 1, ids_keep[..., None].expand(-1, -1, pixels.shape[-1]))
        proj = self.patch_embed.proj
        x = F.linear(pixels, proj.weight.reshape(proj.weight.shape[0], -1), proj.bias)
        pos = self.pos_embed[0, 1:][ids_keep]
        return x + pos

    def encoder_tokens(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """The encoder's input: the class token (with its position) before the embedded patches `ids_keep`."""
        x = self.embed_patches(imgs, ids_keep)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward_encoder(self, imgs: torch.Tensor, ids_shuffle: torch.Tensor, num_keep: int) -> torch.Tensor:
        """Encode the class token and the first `num_keep` patches of `ids_shuffle`."""
        x = self.encoder_tokens(imgs, ids_shuffle[:, :num_keep])
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The encoder's normed tokens [B, 1+L, D] of the whole image, no patch masked: what the k-NN monitor
        reads (engine_knn) and what fine-tuning starts from."""
        ids = torch.arange(self.num_patches, device=imgs.device).expand(imgs.shape[0], -1)
        x = self.encoder_tokens(imgs, ids)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def cls_attention(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, L] head-averaged class-token attention to the patches in the last encoder block, every patch
        visible (what visualize.py draws). Computed from the last block's own layers rather than captured by a
        hook, because a hook on a block that torch.compile has captured never fires."""
        ids = torch.arange(self.num_patches, device=imgs.device).expand(imgs.shape[0], -1)
        x = self.encoder_tokens(imgs, ids)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return block_cls_attention(self.blocks[-1], x)[:, 1:]

    def forward_decoder(self, latent: torch.Tensor, ids_shuffle: torch.Tensor) -> torch.Tensor:
        """Decode [B, 1+K, D] encoder outputs into [B, 1+L, out] predictions in image order.

        Tokens are kept in shuffled order (class, visible, masked) through the blocks, which is
        equivalent to image order because neither decoder's blocks depend on token order once the
        position embedding is added; one gather at the end puts them back in image order.
        """
        b, num_keep = latent.shape[0], latent.shape[1] - 1
        x = self.decoder_embed(latent)
        pos = self.decoder_pos_embed.expand(b, -1, -1)
        pos_shuffled = torch.gather(pos[:, 1:], 1, ids_shuffle[..., None].expand(-1, -1, x.shape[-1]))
        fixed = x + torch.cat([pos[:, :1], pos_shuffled[:, :num_keep]], dim=1)
        masked = self.mask_token.to(x.dtype) + pos_shuffled[:, num_keep:]
        if self.prompting_decoder:
            for blk in self.decoder_blocks:
                masked = blk(fixed, masked)
            x = torch.cat([fixed, masked], dim=1)
        else:
            x = torch.cat([fixed, masked], dim=1)
            for blk in self.decoder_blocks:
                x = blk(x)
        ids_restore = ids_shuffle.argsort(dim=1)
        patches = torch.gather(x[:, 1:], 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], patches], dim=1)
        return self.decoder_pred(self.decoder_norm(x))

    def forward(self, imgs: torch.Tensor, clip_targets: Optional[torch.Tensor] = None,
                importance: Optional[torch.Tensor] = None, mask_ratio: float = 0.75,
                ids_shuffle: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss, pred, mask): pred [B, 1+L, target_dim] for the CLIP target or [B, L, p*p*3] for
        pixels, mask [B, L] with 1 at masked patches, in image order. `importance` switches masking
        from random to semantic-aware; `ids_shuffle` fixes the masking order instead (tests, visualisation)."""
        if self.target == 'clip' and clip_targets is None:
            raise ValueError('the CLIP target needs clip_targets from the teacher')
        b = imgs.shape[0]
        num_keep = self.num_visible(mask_ratio)
        if ids_shuffle is None:
            ids_shuffle = masking_order(b, self.num_patches, imgs.device, importance)
        latent = self.forward_encoder(imgs, ids_shuffle, num_keep)
        pred = self.forward_decoder(latent, ids_shuffle)
        mask = torch.ones(b, self.num_patches, device=imgs.device)
        mask.scatter_(1, ids_shuffle[:, :num_keep], 0.0)
        if self.target == 'clip':
            return clip_feature_loss(pred, clip_targets), pred, mask
        pred = pred[:, 1:]
        return pixel_loss(pred, patchify(imgs, self.patch_size), mask, self.norm_pix_loss), pred, mask


_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)

# The --model choices. The tiny one is for the CPU demo and tests (64x64 inputs), not a published setting.
MODELS = {
    'mae_vit_tiny_patch8': dict(patch_size=8, embed_dim=192, depth=4, num_heads=3,
                                decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    'mae_vit_small_patch16': dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, **_DECODER),
    'mae_vit_base_patch16': dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, **_DECODER),
    'mae_vit_large_patch16': dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_DECODER),
    'mae_vit_huge_patch14': dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_DECODER),
}


def create_model(name: str, **kwargs) -> MilanViT:
    """A MilanViT of the named size; kwargs set the input size, target and decoder type."""
    return MilanViT(**MODELS[name], **kwargs)


# The flags that define a pretraining run's method, with their defaults (main_pretrain's, and what a checkpoint
# that lacks one of them was trained with).
FLAG_DEFAULTS = dict(model='mae_vit_base_patch16', input_size=224, mask_ratio=0.75, use_clip=False,
                     change_decoder=False, attn_mask=False, norm_pix_loss=False, clip_model='ViT-B/16',
                     average_targets=1, teacher_input_norm='imagenet', teacher_weights='', teacher_input_size=None)


def create_from_flags(flags: dict, target_dim: int = 512) -> MilanViT:
    """The MilanViT that a run's flags (a dict such as a checkpoint's 'args') describe; `target_dim` is the
    teacher's feature width (the CLIP target)."""
    flags = {**FLAG_DEFAULTS, **flags}
    return create_model(flags['model'], img_size=flags['input_size'], target='clip' if flags['use_clip'] else 'pixel',
                        target_dim=target_dim, prompting_decoder=flags['change_decoder'],
                        norm_pix_loss=flags['norm_pix_loss'])


class BatchLoss(NamedTuple):
    """One batch through the method: the loss, the student's prediction and mask (MilanViT.forward's), and the
    teacher's targets and class-token importance (None for the pixel target)."""
    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    targets: Optional[torch.Tensor]
    importance: Optional[torch.Tensor]


def batch_loss(model: nn.Module, teacher: Optional[nn.Module], images: torch.Tensor, mask_ratio: float,
               attn_mask: bool, teacher_input_norm: str = 'imagenet') -> BatchLoss:
    """The loss of a normalised batch: the teacher's targets and importance from its view of the batch, the
    student's reconstruction under random or (`attn_mask`) semantic-aware masking. `model` may be DDP-wrapped;
    `teacher` is None for the pixel target."""
    targets = importance = None
    if teacher is not None:
        targets, importance = teacher(teacher_view(images, teacher_input_norm, teacher))
    loss, pred, mask = model(images, targets, importance if attn_mask else None, mask_ratio)
    return BatchLoss(loss, pred, mask, targets, importance)
