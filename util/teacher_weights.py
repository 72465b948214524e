"""Weight files for timm teachers (`--teacher_weights`): a timm or open_clip state dict (.pth/.bin/.safetensors,
bare or wrapped in {'state_dict': ...} or {'model': ...}, with DDP/compile prefixes), which timm's own checkpoint
filters then convert, or SLIP's checkpoint, which no timm filter reads and is converted here."""
import torch
from safetensors.torch import load_file  # a dependency of timm

from util.errors import UserError
from util.pretrained import read_checkpoint, strip_prefixes

SLIP_PROJECTION = 'image_projection'


def read_teacher_weights(path: str) -> dict:
    """The tensors of a teacher weight file, unwrapped and without wrapper prefixes."""
    if path.endswith('.safetensors'):
        try:
            state = load_file(path)
        except Exception as e:
            raise UserError(f'cannot read {path} as a safetensors file ({str(e).splitlines()[0]}); '
                            f'it may be truncated: download it again') from None
    else:
        state = read_checkpoint(path)
    for key in ('state_dict', 'model', 'module'):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    state = {k: v for k, v in strip_prefixes(state).items() if isinstance(v, torch.Tensor)}
    if not state:
        raise UserError(f'{path} holds no tensors; pass a timm, open_clip or SLIP weight file')
    return state


def is_slip(state: dict) -> bool:
    """SLIP's checkpoints: a timm ViT under `visual.` and the image projection as a bare [width, dim] matrix."""
    return SLIP_PROJECTION in state and 'visual.cls_token' in state


def from_slip(state: dict) -> dict:
    """SLIP's image tower as a timm VisionTransformer state dict whose head is the image projection (zero bias),
    so that the head's output is SLIP's image embedding; the text tower and the SimCLR head are dropped."""
    out = {k[len('visual.'):]: v for k, v in state.items() if k.startswith('visual.')}
    projection = state[SLIP_PROJECTION]
    out['head.weight'] = projection.t().contiguous()
    out['head.bias'] = torch.zeros(projection.shape[1], dtype=projection.dtype)
    return out
