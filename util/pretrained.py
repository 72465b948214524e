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


# Packages whose objects MMEngine-era checkpoints pickle next to the weights (MMEngine's MessageHub and its
# HistoryBuffers, NumPy arrays and scalars): rebuilt as Inert stand-ins, their code never imported nor run.
INERT_PACKAGES = ('mmengine', 'mmcv', 'mmpretrain', 'mmselfsup', 'mmcls', 'numpy')


class Inert:
    """What a checkpoint holds of a class from INERT_PACKAGES: the name, arguments and state it was pickled with,
    nothing of its behaviour. Weights never live in such objects (MMEngine keeps them in plain dicts)."""
    pickled_as = '?'

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        self.args, self.state = args, None
        return self

    def __init__(self, *args, **kwargs):  # the pickle "calls" the class or function it stands for
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f'<{self.pickled_as}, not loaded>'


def _inert_stand_ins(names):
    """(stand-in, name) pairs for torch.serialization.safe_globals: one Inert subclass per pickled global."""
    return [(type(name.rsplit('.', 1)[-1], (Inert,), {'pickled_as': name}), name) for name in sorted(names)]


def _refused_globals(path):
    """The globals of `path` that the weights-only loader would refuse, found by scanning its pickle without
    running it; [] when it can't be scanned (not torch's zip format)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return []


WEIGHTS_HINT = "pass a file of weights: ours, a released MAE/MILAN one or an MMEngine one such as MMPretrain's"


def load_weights_only(path, hint=WEIGHTS_HINT):
    """What `path` holds, always through torch's weights-only loader: a pickled argparse.Namespace (released
    MAE/MILAN files) is allowed, and the globals of INERT_PACKAGES (an MMEngine file's `message_hub`, NumPy
    objects) come back as Inert stand-ins. A global of any other package is refused before loading, so no pickled
    code runs and a large file is read once. Errors are one line ending in `hint`, what to pass instead."""
    if not os.path.isfile(path):
        raise UserError(f'checkpoint {path}: no such file')
    refused = _refused_globals(path)
    foreign = [name for name in refused if name.split('.')[0] not in INERT_PACKAGES]
    if foreign:
        raise UserError(f'cannot read {path} as a checkpoint (it holds objects the safe loader refuses: '
                        f'{", ".join(foreign[:3])}); {hint}')
    try:
        with torch.serialization.safe_globals([argparse.Namespace, *_inert_stand_ins(refused)]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f'cannot read {path} as a checkpoint ({load_failure(e, path)}); it may be truncated or not '
                        f'a PyTorch file at all (e.g. an HTML page saved by a failed download): {hint}') from None


def read_checkpoint(path):
    """Any checkpoint dict (load_weights_only): ours, a released MAE/MILAN file, an MMEngine one (MMPretrain's)."""
    ckpt = load_weights_only(path)
    if not isinstance(ckpt, dict):
        raise UserError(f'{path} holds a {type(ckpt).__name__}, not a checkpoint dict')
    return ckpt


def checkpoint_epoch(ckpt):
    """The epoch a checkpoint was written at, counted from 0 as ours and MAE's are (the last one finished, or with
    ours' `resume_iter` the one it stopped in); MMEngine's meta counts finished epochs from 1. None if unsaid."""
    epoch = ckpt.get('epoch')
    if isinstance(epoch, int) and not isinstance(epoch, bool):
        return epoch
    meta = ckpt.get('meta')
    epoch = meta.get('epoch') if isinstance(meta, dict) else None
    return epoch - 1 if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 1 else None


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
# timm's names, which are also our MilanViT encoder's.
MMPRETRAIN_NAMES = ((r'patch_embed\.projection\.', 'patch_embed.proj.'), (r'layers\.(\d+)\.ln1\.', r'blocks.\1.norm1.'),
                    (r'layers\.(\d+)\.ln2\.', r'blocks.\1.norm2.'), (r'layers\.(\d+)\.attn\.', r'blocks.\1.attn.'),
                    (r'layers\.(\d+)\.ffn\.layers\.0\.0\.', r'blocks.\1.mlp.fc1.'),
                    (r'layers\.(\d+)\.ffn\.layers\.1\.', r'blocks.\1.mlp.fc2.'), (r'ln1\.', 'norm.'),
                    (r'ln2\.', 'fc_norm.'), (r'(cls_token|pos_embed)$', r'\1'))
# Its pretraining decoders (`neck.*`: MILANPretrainDecoder, MAEPretrainDecoder) in our MilanViT's decoder names.
# Both keep MAE's names for the embedding, mask token, position table and prediction; their blocks are MMPretrain
# transformer layers (ln1, ln2, ffn.layers.*) and the final norm is `ln1`. MILAN's prompting attention has our
# q and kv projections, kv's rows all keys then all values (heads contiguous in each) as ours; MAE's blocks have
# timm's qkv. So every tensor maps whole, with the same layout.
MMPRETRAIN_NECK = ((r'(decoder_embed|decoder_pred)\.(weight|bias)', r'\1.\2'),
                   (r'(mask_token|decoder_pos_embed)', r'\1'),
                   (r'decoder_blocks\.(\d+)\.ln([12])\.(weight|bias)', r'decoder_blocks.\1.norm\2.\3'),
                   (r'decoder_blocks\.(\d+)\.attn\.(q|kv|qkv|proj)\.(weight|bias)', r'decoder_blocks.\1.attn.\2.\3'),
                   (r'decoder_blocks\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)', r'decoder_blocks.\1.mlp.fc1.\2'),
                   (r'decoder_blocks\.(\d+)\.ffn\.layers\.1\.(weight|bias)', r'decoder_blocks.\1.mlp.fc2.\2'),
                   (r'ln1\.(weight|bias)', r'decoder_norm.\1'))
MMPRETRAIN_HEADS = ('head.fc.', 'head.layers.head.')  # fine-tuning's LinearClsHead, probing's ViT head
# Parts dropped by name (the most specific prefix first), with the reason logged.
MMPRETRAIN_DROPPED = {'neck.bn.': 'the linear probe\'s BatchNorm statistics (ClsBatchNormNeck)',
                      'target_generator.': 'the frozen CLIP teacher',
                      'data_preprocessor.': 'the input normalisation constants'}


def is_mmpretrain(state):
    return 'backbone.patch_embed.projection.weight' in state


def _neck_name(rest):
    """Our decoder's name for MMPretrain's `neck.<rest>`, or None."""
    for pattern, name in MMPRETRAIN_NECK:
        if re.fullmatch(pattern, rest):
            return re.sub(pattern, name, rest)
    return None


def from_mmpretrain(state, path):
    """MMPretrain's keys in our names: `backbone.*` and `head.*` in timm's (a classifier's), the pretraining
    decoder `neck.*` in our MilanViT's (read_pretrained drops it again for classifiers). Other keys are dropped by
    name with a reason; a key that is neither is refused (it would mean a model this code does not know). A neck
    with any key that is not MILAN's or MAE's decoder is dropped whole, so a decoder is never half loaded."""
    out, decoder, dropped, strange_neck = {}, {}, {}, None
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
        elif key.startswith('neck.') and not key.startswith('neck.bn.'):
            name = _neck_name(key[len('neck.'):])
            if name is None:
                strange_neck = strange_neck or key
            decoder[name or key] = value
        else:
            prefix = next((p for p in MMPRETRAIN_DROPPED if key.startswith(p)), None)
            if prefix is None:
                raise UserError(f'{path}: MMPretrain key {key} is neither the ViT, its head, nor a part this code '
                                f'drops knowingly; pass a MILAN/MAE checkpoint or its fine-tuned model')
            dropped[prefix] = dropped.get(prefix, 0) + 1
    reasons = dict(MMPRETRAIN_DROPPED)
    if strange_neck:
        dropped['neck.'] = len(decoder)
        reasons['neck.'] = f'not MILAN\'s or MAE\'s decoder: {strange_neck} is neither\'s'
    else:
        out.update(decoder)
    kept = f' ({len(decoder)} of them the decoder, from neck.*)' if decoder and not strange_neck else ''
    log(f'{path}: MMPretrain layout, {len(out)} tensors in our names{kept}; dropped '
        + (', '.join(f'{n} {p[:-1]}.* ({reasons[p]})' for p, n in dropped.items()) or 'nothing'))
    return out


def stored_state(ckpt):
    """The state dict a checkpoint keeps its weights in, in its own names (ours and MAE's under `model`, MMEngine's
    under `state_dict`; a bare state dict is its own), with the DDP/compile prefixes stripped; {} if none."""
    state = ckpt.get('model', ckpt.get('state_dict', ckpt))
    return strip_prefixes(state) if isinstance(state, dict) else {}


def model_state(ckpt, path):
    """The weights (stored_state), MMPretrain's in timm's names."""
    state = stored_state(ckpt)
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f'{path} holds no model state dict')
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
