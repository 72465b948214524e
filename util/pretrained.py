"""Reading any checkpoint (ours, a released MAE/MILAN file, MMPretrain's) safely, and loading a pretrained encoder
into a fine-tuning/probing ViT."""
import argparse
import os
import re

import torch

from util.errors import UserError
from util.logger import log
from util.pos_embed import interpolate_pos_embed

# Keys a pretraining checkpoint holds that a classifier never uses.
DROP_PREFIXES = ('decoder_', 'mask_token', 'teacher', 'clip')
PREFIXES = ('module.', '_orig_mod.')


def read_checkpoint(path):
    """Any checkpoint dict: ours, or a released MAE/MILAN file whose pickled argparse.Namespace is the one
    class the weights-only loader is allowed to rebuild."""
    if not os.path.isfile(path):
        raise UserError(f'checkpoint {path}: no such file')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f'cannot read {path} as a checkpoint ({load_failure(e, path)}); it may be truncated or not '
                        f'a PyTorch file at all (e.g. an HTML page saved by a failed download)') from None
    if not isinstance(ckpt, dict):
        raise UserError(f'{path} holds a {type(ckpt).__name__}, not a checkpoint dict')
    return ckpt


def strip_prefixes(state):
    """Keys without the prefixes DDP (`module.`) and torch.compile (`_orig_mod.`) wrappers add."""
    clean = {}
    for key, value in state.items():
        while key.startswith(PREFIXES):
            key = key.split('.', 1)[1]
        clean[key] = value
    return clean


def load_failure(error, path):
    """Why torch.load failed on `path`, in a few words of our own. torch's texts run long or say little
    ("Invalid argument" for a cut-off archive), and the weights-only unpickler's suggests an unsafe retry with
    weights_only=False, which must never reach a user; what it refused comes after its marker."""
    text = str(error)
    if 'WeightsUnpickler error:' in text:
        refused = text.split('WeightsUnpickler error:', 1)[1].strip().split('. ')[0].splitlines()[0]
        return f'it holds objects the safe loader refuses: {refused[:150]}'
    with open(path, 'rb') as f:
        head = f.read(4)
    if not head:
        return 'an empty file'
    if head == b'PK\x03\x04':  # torch's zip format
        return 'a damaged or incomplete zip archive'
    if isinstance(error, EOFError):
        return 'the file ends early'
    return 'not a pickle or zip archive that torch wrote'


# MMPretrain's ViT (mmpretrain.models.backbones.VisionTransformer, which MILAN's and MAE's backbones extend) in
# timm's names; its decoder and teacher are dropped by name, with the reason logged.
MMPRETRAIN_NAMES = ((r'patch_embed\.projection\.', 'patch_embed.proj.'), (r'layers\.(\d+)\.ln1\.', r'blocks.\1.norm1.'),
                    (r'layers\.(\d+)\.ln2\.', r'blocks.\1.norm2.'), (r'layers\.(\d+)\.attn\.', r'blocks.\1.attn.'),
                    (r'layers\.(\d+)\.ffn\.layers\.0\.0\.', r'blocks.\1.mlp.fc1.'),
                    (r'layers\.(\d+)\.ffn\.layers\.1\.', r'blocks.\1.mlp.fc2.'), (r'ln1\.', 'norm.'),
                    (r'ln2\.', 'fc_norm.'), (r'(cls_token|pos_embed)$', r'\1'))
MMPRETRAIN_HEADS = ('head.fc.', 'head.layers.head.')  # fine-tuning's LinearClsHead, probing's ViT head
MMPRETRAIN_DROPPED = {'neck.': 'the pretraining decoder (MILAN\'s prompting decoder, MAE\'s) or the linear probe\'s '
                               'BatchNorm statistics', 'target_generator.': 'the frozen CLIP teacher',
                      'data_preprocessor.': 'the input normalisation constants'}


def is_mmpretrain(state):
    return 'backbone.patch_embed.projection.weight' in state


def from_mmpretrain(state, path):
    """MMPretrain's keys (`backbone.*`, `head.*`) in timm's names; every other key is dropped by name with a
    reason, and a key that is neither is refused (it would mean a model this code does not know)."""
    out, dropped = {}, {}
    for key, value in state.items():
        if key.startswith('backbone.'):
            rest = key[len('backbone.'):]
            for pattern, name in MMPRETRAIN_NAMES:
                if re.match(pattern, rest):
                    out[re.sub(pattern, name, rest, count=1)] = value
                    break
            else:
                raise UserError(f'{path}: MMPretrain key {key} has no counterpart in a timm ViT; pass a plain ViT '
                                f'checkpoint (MILAN, MAE or its fine-tuned model)')
        elif key.startswith(MMPRETRAIN_HEADS):
            out['head.' + key.rsplit('.', 1)[1]] = value
        else:
            prefix = next((p for p in MMPRETRAIN_DROPPED if key.startswith(p)), None)
            if prefix is None:
                raise UserError(f'{path}: MMPretrain key {key} is neither the ViT, its head, nor a part this code '
                                f'drops knowingly; pass a MILAN/MAE checkpoint or its fine-tuned model')
            dropped[prefix] = dropped.get(prefix, 0) + 1
    log(f'{path}: MMPretrain layout, {len(out)} tensors in timm\'s names; dropped '
        + (', '.join(f'{n} {p[:-1]}.* ({MMPRETRAIN_DROPPED[p]})' for p, n in dropped.items()) or 'nothing'))
    return out


def model_state(ckpt, path):
    """The weights, with the DDP/compile prefixes stripped (MMPretrain's in timm's names); a bare state dict is its
    own weights."""
    state = ckpt.get('model', ckpt.get('state_dict', ckpt))
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f'{path} holds no model state dict')
    state = strip_prefixes(state)
    return from_mmpretrain(state, path) if is_mmpretrain(state) else state


def read_pretrained(path):
    """The encoder weights of a pretraining checkpoint (ours, MAE's or MILAN's): decoder and teacher keys
    dropped."""
    return {k: v for k, v in model_state(read_checkpoint(path), path).items() if not k.startswith(DROP_PREFIXES)}


def load_pretrained(model, path, allowed_missing, state=None):
    """Load the encoder weights into `model` (a timm ViT): the head is dropped when its shape differs, the
    position table is resized to the model's grid. Missing keys beyond `allowed_missing` (the new head, and
    fc_norm with global pooling) or a shape that doesn't fit mean another model: refused. `state`: the file's
    read_pretrained, when the caller has already read it."""
    state = dict(read_pretrained(path) if state is None else state)
    own = model.state_dict()
    for key in [k for k in state if k.startswith('head') and (k not in own or state[k].shape != own[k].shape)]:
        del state[key]
    if 'pos_embed' in state:
        grid = model.patch_embed.grid_size[0]
        if state['pos_embed'].shape[-1] == own['pos_embed'].shape[-1]:
            state['pos_embed'] = interpolate_pos_embed(state['pos_embed'], grid)
    mismatched = [f'{k} {tuple(v.shape)} vs {tuple(own[k].shape)}' for k, v in state.items()
                  if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(state) - set(allowed_missing))
    if mismatched or missing:
        detail = mismatched[0] if mismatched else f'missing {", ".join(missing[:3])}'
        raise UserError(f'{path} does not fit this model ({detail}); pass the --model it was pretrained as')
    result = model.load_state_dict(state, strict=False)
    log(f'loaded pretrained weights from {path}; new: {", ".join(result.missing_keys) or "-"}; '
        f'unused: {", ".join(result.unexpected_keys) or "-"}')
    return result
