"""MILAN's frozen teacher, whichever it is: OpenAI's CLIP (models_clip, as the paper), or any timm ViT named
`timm:<model name>` (open CLIPs, EVA-CLIP, SigLIP, SLIP, DINO, DINOv2, DINOv3, ...), with timm's own weights or a
file. Every teacher gives, for an image batch, the per-token targets [B, 1+L, D] and the importance [B, L] that
semantic-aware masking draws from, in one pass through its blocks, never through hooks.

Targets, as each family defines its image embedding: the final norm's tokens (DINO family), then the image
projection for CLIP-trained models (timm's head there; SLIP's image projection); register tokens are dropped.
Without a class token (SigLIP), the class slot of the loss is the model's pooled image embedding (SigLIP: its
attention pool's output). Importance: the class token's head-averaged attention over the patches in the last
block (after rotary embedding, where the model has one), else the attention pool's probe attention.
"""
import re
import sys
from typing import Optional

import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention, AttentionPoolLatent, apply_rot_embed_cat
from timm.models.eva import Eva, EvaAttention, EvaBlock
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from models_clip import build_random_teacher, load_clip_teacher
from util.data import IMAGENET_MEAN, IMAGENET_STD
from util.errors import UserError, check
from util.logger import log
from util.teacher_weights import from_slip, is_slip, read_teacher_weights

TIMM = 'timm:'
# timm's modules of the ViT classes a TimmTeacher reads (VisionTransformer and DeiT's subclasses of it, Eva)
VIT_MODULES = ('vision_transformer', 'deit', 'eva')


def _class_row(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, N] head-averaged softmax attention of the first query over all N keys, from q [B, H, >=1, hd] and
    k [B, H, N, hd]. An elementwise product and sum, not a matmul, so autocast cannot lower it to bf16."""
    logits = (q[:, :, :1].float() * k.float()).sum(-1) * scale
    return logits.softmax(-1).mean(1)


def vit_cls_attention(block: Block, x: torch.Tensor) -> torch.Tensor:
    """The class token's attention row over all keys in a timm `Block` whose input is x, from its own layers."""
    attn, (b, n, _) = block.attn, x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return _class_row(attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), attn.scale)


def eva_cls_attention(block: EvaBlock, x: torch.Tensor, rope: Optional[torch.Tensor]) -> torch.Tensor:
    """The same row for an `EvaBlock` (DINOv3, EVA-02): fused or separate q/k projections, q/k norms, then the
    rotary embedding on the patch keys (the class query, a prefix token, is never rotated)."""
    attn, (b, n, _) = block.attn, x.shape
    h = block.norm1(x)
    heads = attn.num_heads
    if attn.qkv is not None:
        bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        q, k, _ = F.linear(h, attn.qkv.weight, bias).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = attn.q_proj(h).reshape(b, n, heads, -1).transpose(1, 2)
        k = attn.k_proj(h).reshape(b, n, getattr(attn, 'num_kv_heads', heads), -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    prefix = attn.num_prefix_tokens
    if rope is not None:
        half = getattr(attn, 'rotate_half', False)
        k = torch.cat([k[:, :, :prefix], apply_rot_embed_cat(k[:, :, prefix:], rope, half=half).type_as(k)], 2)
        if prefix == 0:
            q = apply_rot_embed_cat(q, rope, half=half).type_as(q)
    k = k.repeat_interleave(getattr(attn, 'num_kv_groups', 1), dim=1)
    return _class_row(q, k, attn.scale)


def pool_attention(pool: AttentionPoolLatent, tokens: torch.Tensor) -> torch.Tensor:
    """[B, L] head-averaged attention of an attention pool's (first) probe over the tokens it pools."""
    b, n, _ = tokens.shape
    if pool.pos_embed is not None:
        tokens = tokens + pool.pos_embed.unsqueeze(0)
    q = pool.q(pool.latent.expand(b, -1, -1)).reshape(b, pool.latent_len, pool.num_heads, pool.head_dim)
    k = pool.kv(tokens).reshape(b, n, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4)[0]
    return _class_row(pool.q_norm(q.transpose(1, 2)), pool.k_norm(k), pool.scale)


class TimmTeacher(nn.Module):
    """A frozen timm ViT (`VisionTransformer` or `Eva`) as the teacher: forward gives (targets [B, 1+L, D],
    importance [B, L] or None). `projection`: the targets go through the model's head (the CLIP image
    projection); `mean`/`std`: the statistics it was trained with (--teacher_input_norm teacher)."""

    def __init__(self, model: nn.Module, projection: bool, average_targets: int = 1, name: str = 'timm',
                 mean=None, std=None):
        super().__init__()
        if not isinstance(model, (VisionTransformer, Eva)):
            raise UserError(f'{name} is a {type(model).__name__}, not a ViT; pass a timm ViT teacher such as '
                            f'timm:vit_base_patch16_clip_224.laion2b or timm:vit_base_patch14_dinov2.lvd142m')
        depth = len(model.blocks)
        if not 1 <= average_targets <= depth:
            raise UserError(f'--average_targets {average_targets} is out of range; '
                            f'the teacher has {depth} blocks, pick 1..{depth}')
        self.model = model
        self.name = name
        self.eva = isinstance(model, Eva)
        self.projection = projection
        self.average_targets = average_targets
        self.patch_size = model.patch_embed.patch_size[0]
        self.grid_size = model.patch_embed.grid_size[0]
        self.input_size = self.patch_size * self.grid_size
        self.prefix = model.num_prefix_tokens
        self.has_class_token = model.cls_token is not None
        self.output_dim = model.head.out_features if projection else model.embed_dim
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        self.mean = tuple(mean or cfg.get('mean', IMAGENET_MEAN))
        self.std = tuple(std or cfg.get('std', IMAGENET_STD))
        # the per-token norm: the final one, or the pooled feature's norm in models that only norm the pool
        self.token_norm = model.fc_norm if isinstance(model.norm, nn.Identity) else model.norm
        last = model.blocks[-1]
        if self.has_class_token:
            known = (isinstance(last, EvaBlock) and isinstance(last.attn, EvaAttention)) if self.eva else \
                (isinstance(last, Block) and isinstance(last.attn, Attention))
            self.importance_source = 'class token' if known else None
        else:
            self.importance_source = 'attention pool' if isinstance(model.attn_pool, AttentionPoolLatent) else None
        self.requires_grad_(False)
        self.train(False)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, which --compile compiles one by one."""
        return self.model.blocks

    def train(self, mode: bool = True):
        """The teacher never trains: stays in eval mode whatever the caller's model.train() says."""
        return super().train(False)

    def _blocks(self, x: torch.Tensor):
        """Run the blocks: (the last block's input, its rotary embedding or None, the outputs of the blocks whose
        features are averaged)."""
        m = self.model
        x = m.patch_embed(x)
        if self.eva:
            x, rope = m._pos_embed(x)
        else:
            x, rope = m.patch_drop(m._pos_embed(x)), None
        x = m.norm_pre(x)
        mixed = self.eva and getattr(m, 'rope_mixed', False) and rope is not None
        depth, kept, last_in, last_rope = len(m.blocks), [], x, None
        for i, block in enumerate(m.blocks):
            last_in, last_rope = x, (rope[i] if mixed else rope)
            x = block(x, rope=last_rope) if self.eva else block(x)
            if i >= depth - self.average_targets:
                kept.append(x)
        return last_in, last_rope, kept

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """images [B, 3, S, S], normalised -> targets [B, 1+L, output_dim], importance [B, L] float32 or None."""
        if tuple(images.shape[-2:]) != (self.input_size, self.input_size):
            raise UserError(f'the teacher {self.name} takes {self.input_size}x{self.input_size} images but got '
                            f'{images.shape[-2]}x{images.shape[-1]}; set --teacher_input_size {self.input_size}')
        last_in, rope, kept = self._blocks(images)
        norm = self.token_norm
        tokens = norm(kept[0]) if len(kept) == 1 else norm(torch.stack([norm(t) for t in kept]).mean(0))
        patches = tokens[:, self.prefix:]
        if self.has_class_token:
            first = tokens[:, :1]
        else:  # the image embedding the model pools (SigLIP: its attention pool) fills the class slot
            first = self.model.forward_head(tokens, pre_logits=True)[:, None]
        targets = torch.cat([first, patches], dim=1)
        if self.projection:
            targets = self.model.head(targets)
        importance = None
        if self.importance_source == 'class token':
            last = self.model.blocks[-1]
            row = eva_cls_attention(last, last_in, rope) if self.eva else vit_cls_attention(last, last_in)
            importance = row[:, self.prefix:]
        elif self.importance_source == 'attention pool':  # over the last block's tokens, whatever is averaged
            last = tokens if len(kept) == 1 else norm(kept[-1])
            importance = pool_attention(self.model.attn_pool, last[:, self.prefix:])
        return targets, importance


def _openai_activation(arch: str) -> dict:
    """timm builds its `*_clip_*.openai` models with GELU, but OpenAI trained them with QuickGELU: build those
    with QuickGELU so that they give OpenAI's numbers (timm's `*_clip_quickgelu_*` names already do)."""
    base, _, tag = arch.partition('.')
    if tag == 'openai' and '_clip_' in base and 'quickgelu' not in base:
        log(f'note: {arch} is built with QuickGELU, as OpenAI trained it (timm\'s default for that name is GELU)')
        return {'act_layer': 'quick_gelu'}
    return {}


def build_timm_teacher(arch: str, weights: str = '', input_size: int = 224, average_targets: int = 1,
                       pretrained: bool = True, student_grid: Optional[int] = None, **model_args) -> TimmTeacher:
    """A frozen fp32 TimmTeacher on the CPU for timm model `arch` at `input_size` (the position table resampled by
    timm), with timm's pretrained weights (the Hugging Face cache; works offline once cached), the weight file
    `weights` (timm, open_clip or SLIP), or random ones (pretrained=False: benchmarks and tests). `model_args`
    override the architecture (tests build tiny models); `student_grid` names the size that fits in the message
    when `input_size` is no multiple of the teacher's patches."""
    name = TIMM + arch
    if not timm.is_model(arch):
        raise UserError(f'{name} is not a timm model name; list them with python -c "import timm; '
                        f'print(timm.list_models(\'*{arch.split(".")[0][:12]}*\', pretrained=True))"')
    family = timm.models.model_entrypoint(arch.partition('.')[0]).__module__.rsplit('.', 1)[-1]
    if family not in VIT_MODULES:
        raise UserError(f'{name} is a {family} model, not a ViT; pass a timm ViT teacher such as '
                        f'timm:vit_base_patch16_clip_224.laion2b or timm:vit_base_patch14_dinov2.lvd142m')
    state = read_teacher_weights(weights) if weights else None
    slip = state is not None and is_slip(state)
    cfg = timm.get_pretrained_cfg(arch)
    base, _, tag = arch.partition('.')
    # a CLIP's head is its image projection, unless the tag says it was fine-tuned into a classifier
    projection = slip or ('_clip' in base and not re.search(r'(^|_)ft(_|$)', tag))
    args = {'img_size': input_size, **_openai_activation(arch), **model_args}
    if slip:
        state = from_slip(state)
        args['num_classes'] = state['head.weight'].shape[0]
    elif not projection:
        args['num_classes'] = 0  # a classifier's head is not part of the target
        if state is not None and cfg is not None and cfg.classifier:
            state = {k: v for k, v in state.items() if not k.startswith(cfg.classifier + '.')}
    hub = state is None and pretrained
    try:
        model = timm.create_model(arch, pretrained=hub, **args)
    except (TypeError, AssertionError, ValueError) as e:
        raise UserError(f'cannot build {name} at {input_size}px ({str(e).splitlines()[0]}); check the name and '
                        f'--teacher_input_size') from None
    except (OSError, RuntimeError) as e:
        if not hub:
            raise
        raise UserError(f'cannot get timm\'s weights for {name} ({str(e).splitlines()[0][:160]}); download them '
                        f'once with network access (they are cached), or pass --teacher_weights FILE') from None
    patch = model.patch_embed.patch_size[0]
    if input_size % patch:
        fits = (student_grid or round(input_size / patch)) * patch
        raise UserError(f'{name} cuts {patch}px patches, so it cannot see {input_size}px images; pass '
                        f'--teacher_input_size {fits}')
    if state is not None:
        _load(model, state, weights, name)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if slip else (None, None)  # SLIP trained on ImageNet statistics
    return TimmTeacher(model.float(), projection, average_targets, name, mean, std)


def _load(model: nn.Module, state: dict, path: str, name: str) -> None:
    """The file's tensors through the model's own timm checkpoint filter (OpenAI/open_clip layouts, position
    tables resampled to the model's grid), then loaded strictly: a file for another model is refused."""
    filter_fn = getattr(sys.modules[type(model).__module__], 'checkpoint_filter_fn', None)
    try:
        state = filter_fn(state, model) if filter_fn is not None else state
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(f'{path} does not fit {name} ({str(e).strip().splitlines()[-1].strip()[:160]}); pass the '
                        f'weights of that model') from None
    if missing or unexpected:
        raise UserError(f'{path} does not fit {name} (missing: {", ".join(missing[:4]) or "-"}; unexpected: '
                        f'{", ".join(unexpected[:4]) or "-"}); pass the weights of that model')


def check_grid(teacher: nn.Module, patch_size: int, grid_size: int) -> None:
    """Targets are per patch, so teacher and student must cut the image into the same grid."""
    if teacher.grid_size == grid_size:
        return
    fix = (f'pass --teacher_input_size {grid_size * teacher.patch_size}' if isinstance(teacher, TimmTeacher) else
           'pick a student --model/--input_size with the same grid')
    raise UserError(f'the teacher uses {teacher.patch_size}px patches on a {teacher.grid_size}x{teacher.grid_size} '
                    f'grid but the student uses {patch_size}px patches on a {grid_size}x{grid_size} grid; {fix}')


def build_teacher(flags, patch_size: int, grid_size: int) -> Optional[nn.Module]:
    """The frozen teacher that a run's flags name (use_clip, clip_model, clip_cache, teacher_weights,
    teacher_input_size, average_targets, attn_mask: a Namespace), on the CPU, for a student cutting
    `grid_size`^2 patches of `patch_size`; None for the pixel target."""
    if not flags.use_clip:
        return None
    size = getattr(flags, 'teacher_input_size', None)
    if flags.clip_model.startswith(TIMM):
        arch = flags.clip_model[len(TIMM):]
        if size is None:  # the student's input size; a grid mismatch is refused below, naming the size that fits
            size = patch_size * grid_size
        teacher = build_timm_teacher(arch, getattr(flags, 'teacher_weights', ''), size, flags.average_targets,
                                     student_grid=grid_size)
    elif flags.clip_model == 'random':
        log('WARNING: the CLIP teacher has RANDOM weights: its targets carry no meaning. This is the demo/'
            'smoke-test setting; pass --clip_model ViT-B/16 (or a weight file) for real pretraining.')
        # with --teacher_input_size, patches scaled so that the grid stays the student's
        check(size is None or size % grid_size == 0,
              f'--teacher_input_size {size} is not a multiple of the student\'s {grid_size}x{grid_size} grid')
        teacher = build_random_teacher(size // grid_size if size else patch_size, grid_size,
                                       average_targets=flags.average_targets)
    else:
        teacher = load_clip_teacher(flags.clip_model, flags.clip_cache, flags.average_targets)
        check(size is None or size == teacher.input_size,
              f'OpenAI\'s CLIP {flags.clip_model} takes {teacher.input_size}px images, not --teacher_input_size '
              f'{size}; pass {teacher.input_size}, or a timm CLIP (timm:vit_*_clip_quickgelu_*.openai)')
    check_grid(teacher, patch_size, grid_size)
    if getattr(flags, 'attn_mask', False) and getattr(teacher, 'importance_source', 'class token') is None:
        raise UserError(f'--attn_mask needs the teacher\'s attention, but {flags.clip_model} has neither a class '
                        f'token nor an attention pool this code reads; drop --attn_mask or pick another teacher')
    return teacher
