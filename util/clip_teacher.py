"""The frozen CLIP teacher: OpenAI's CLIP ViT image encoder, giving MILAN's targets and patch importance.

We reimplement the visual tower instead of calling openai-clip's, because its forward returns only the
class token, and MILAN needs every token's projected feature plus the class-token attention row of the
last block. Our forward produces both in one pass with fused attention; parameter names match OpenAI's
`visual.*` keys (minus the prefix), so OpenAI's checkpoints load into it unchanged.
"""
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from util.errors import UserError
from util.logger import log
from util.pretrained import load_failure, strip_prefixes


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

    def train(self, mode=True):
        """The teacher never trains: stays in eval mode whatever the caller's model.train() says."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images):
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


def build_random_teacher(patch_size, grid_size, width=64, layers=2, output_dim=64, average_targets=1, seed=0):
    """A randomly initialised teacher for runs without CLIP weights (CPU demo, tests); leaves the global RNG alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ClipTeacher(width, layers, patch_size, grid_size, output_dim, average_targets)


def check_patch_grid(teacher, patch_size, grid_size):
    """Targets are per patch, so teacher and student must cut the image into the same grid."""
    if (teacher.patch_size, teacher.grid_size) != (patch_size, grid_size):
        raise UserError(
            f'teacher CLIP ViT uses {teacher.patch_size}px patches on a {teacher.grid_size}x{teacher.grid_size} '
            f'grid but the student uses {patch_size}px patches on a {grid_size}x{grid_size} grid; '
            f'pick a student --model/--input_size with the same grid')


# OpenAI's published CLIP ViT checkpoints, as in the openai-clip package (a test compares the two), so
# that the runtime does not need that package. The URL's second-to-last component is the file's SHA-256.
_OPENAI = 'https://openaipublic.azureedge.net/clip/models'
CLIP_MODEL_URLS = {
    'ViT-B/32': f'{_OPENAI}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt',
    'ViT-B/16': f'{_OPENAI}/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt',
    'ViT-L/14': f'{_OPENAI}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt',
    'ViT-L/14@336px':
        f'{_OPENAI}/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt',
}
# OpenAI's ResNet CLIPs: named only to tell their users that the teacher must be a ViT.
CLIP_RESNETS = ('RN50', 'RN101', 'RN50x4', 'RN50x16', 'RN50x64')


def _sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


DOWNLOAD_TIMEOUT_S = 60  # a stalled connection fails instead of hanging the run


def download_clip(name, cache_dir):
    """Fetch OpenAI's checkpoint `name` into cache_dir once, verified against its published SHA-256."""
    url = CLIP_MODEL_URLS[name]
    expected = url.split('/')[-2]
    os.makedirs(cache_dir, exist_ok=True)
    target = os.path.join(cache_dir, os.path.basename(url))
    if os.path.isfile(target):
        if not os.access(target, os.R_OK):
            raise UserError(f'{target} exists but you cannot read it; ask its owner to run chmod a+r on it, or pass '
                            f'--clip_cache with a folder of your own')
        if _sha256(target) == expected:
            return target

    print(f'downloading CLIP {name} to {target}', flush=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=os.path.basename(url) + '.', suffix='.part')
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, 'wb') as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as src:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != expected:
            raise UserError(f'CLIP {name} downloaded from {url} has SHA-256 {h.hexdigest()}, expected {expected}; '
                            f'retry, or download it yourself and pass the file path')
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide a shared cache from its other users
        os.replace(tmp, target)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise UserError(f'could not download CLIP {name} from {url} ({e}); '
                        f'check the network or download it yourself and pass the file path') from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def _is_torchscript(path):
    """OpenAI's .pt files are TorchScript archives: zips holding compiled code and constants."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith('constants.pkl') or '/code/' in n for n in z.namelist())


def _read_state_dict(path):
    """The raw tensors of a TorchScript archive or a plain (optionally {'state_dict': ...}-wrapped) state dict."""
    try:
        if _is_torchscript(path):
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', FutureWarning)  # torch.jit.load is deprecated, still works
                return torch.jit.load(path, map_location='cpu').state_dict()
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f'cannot read {path} as a PyTorch checkpoint ({load_failure(e, path)}); it may be truncated or '
                        f'not a PyTorch file at all (e.g. an HTML page saved by a failed download): pass OpenAI\'s '
                        f'CLIP .pt file or a CLIP state-dict file') from None
    if isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict):
        obj = obj['state_dict']
    if not isinstance(obj, dict):
        raise UserError(f'{path} holds a {type(obj).__name__}, not a state dict; '
                        f'pass OpenAI\'s CLIP .pt file or a CLIP state-dict file')
    return obj


def _visual_state_dict(raw, path):
    """Strip `visual.` (dropping the text tower) or accept already-stripped keys, after any DDP/compile
    prefixes; refuse anything else."""
    raw = strip_prefixes(raw)
    if any(k.startswith('visual.') for k in raw):
        sd = {k[len('visual.'):]: v for k, v in raw.items() if k.startswith('visual.')}
    else:
        sd = raw
    if 'attnpool.positional_embedding' in sd:
        raise UserError(f'{path} is a ResNet CLIP; only ViT CLIP models are supported, pass e.g. ViT-B/16')
    required = ('conv1.weight', 'class_embedding', 'positional_embedding', 'proj')
    if not all(isinstance(sd.get(k), torch.Tensor) for k in required):
        raise UserError(f'{path} is not a CLIP ViT checkpoint (no visual.conv1.weight/visual.proj keys); '
                        f'pass OpenAI\'s CLIP .pt file or a CLIP state-dict file')
    return {k: v.float() for k, v in sd.items() if isinstance(v, torch.Tensor)}


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


def load_clip_teacher(name_or_path, cache_dir, average_targets=1):
    """A frozen fp32 teacher on CPU from an OpenAI model name (downloaded into cache_dir) or a local file."""
    path = name_or_path
    if not os.path.exists(path):
        if name_or_path in CLIP_RESNETS:
            raise UserError(f'CLIP model {name_or_path} is a ResNet; only ViT CLIP models are supported, '
                            f'pass e.g. ViT-B/16')
        if name_or_path not in CLIP_MODEL_URLS:
            raise UserError(f'CLIP teacher {name_or_path!r} is neither an existing file nor a CLIP model name; '
                            f'pass a checkpoint path or one of: {", ".join(CLIP_MODEL_URLS)}')
        path = download_clip(name_or_path, cache_dir)
    if not os.path.isfile(path):
        raise UserError(f'CLIP teacher {path} is not a file; pass a checkpoint file or a CLIP model name')
    sd = _visual_state_dict(_read_state_dict(path), path)
    return _teacher_from_state_dict(sd, path, average_targets)


def build_teacher(flags, patch_size, grid_size):
    """The frozen teacher that a run's flags (use_clip, clip_model, clip_cache, average_targets: a Namespace)
    name, on the CPU, for a student cutting `grid_size`^2 patches of `patch_size`; None for the pixel target."""
    if not flags.use_clip:
        return None
    if flags.clip_model == 'random':
        log('WARNING: the CLIP teacher has RANDOM weights: its targets carry no meaning. This is the demo/'
            'smoke-test setting; pass --clip_model ViT-B/16 (or a weight file) for real pretraining.')
        teacher = build_random_teacher(patch_size, grid_size, average_targets=flags.average_targets)
    else:
        teacher = load_clip_teacher(flags.clip_model, flags.clip_cache, flags.average_targets)
    check_patch_grid(teacher, patch_size, grid_size)
    return teacher
