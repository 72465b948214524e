"""CLIP teacher weights: OpenAI's checkpoint names and URLs, a verified download into a shared cache, and the
visual tower's tensors read out of a TorchScript archive or a state-dict file (the architecture they load
into is models_clip.ClipTeacher)."""
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile

import torch

from util.errors import UserError
from util.pretrained import load_failure, load_weights_only, strip_prefixes


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


CLIP_HINT = "pass OpenAI's CLIP .pt file or a CLIP state-dict file"
# Where a CLIP model's own names (`visual.*`, the text tower beside it) start in the state dicts we read: at the top
# (OpenAI's files, a CLIP state dict), or under MMPretrain's CLIPGenerator (`target_generator.tokenizer`, the teacher
# that MMPretrain's MILAN pretraining files carry along with the student).
CLIP_PREFIXES = ('', 'target_generator.tokenizer.')


def _tower_prefix(state):
    """Which of CLIP_PREFIXES a (prefix-stripped) state dict's CLIP visual tower starts at, or None."""
    return next((prefix for prefix in CLIP_PREFIXES if prefix + 'visual.conv1.weight' in state), None)


def carries_clip_teacher(state):
    """Whether a (prefix-stripped) state dict holds a CLIP visual tower beside its own weights, as MMPretrain's
    MILAN pretraining files do: the file itself then serves as its teacher (--clip_model FILE)."""
    return bool(_tower_prefix(state))


def _read_state_dict(path):
    """The raw tensors of a TorchScript archive or a plain (optionally {'state_dict': ...}-wrapped) state dict,
    MMEngine's files included (util.pretrained.load_weights_only)."""
    try:
        if _is_torchscript(path):
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', FutureWarning)  # torch.jit.load is deprecated, still works
                return torch.jit.load(path, map_location='cpu').state_dict()
    except Exception as e:  # a damaged zip (zipfile.BadZipFile) or archive
        raise UserError(f'cannot read {path} as a TorchScript archive ({load_failure(e, path)}); it may be '
                        f'truncated: {CLIP_HINT}') from None
    obj = load_weights_only(path, CLIP_HINT)
    if isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict):
        obj = obj['state_dict']
    if not isinstance(obj, dict):
        raise UserError(f'{path} holds a {type(obj).__name__}, not a state dict; {CLIP_HINT}')
    return obj


def _visual_state_dict(raw, path):
    """Strip `visual.` (dropping the text tower; found at any of CLIP_PREFIXES) or accept already-stripped keys,
    after any DDP/compile prefixes; refuse anything else."""
    raw = strip_prefixes(raw)
    tower = _tower_prefix(raw)
    if tower is not None:
        prefix = tower + 'visual.'
    elif any(k.startswith('visual.') for k in raw):
        prefix = 'visual.'
    else:
        prefix = ''  # the keys are already the tower's
    sd = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    if 'attnpool.positional_embedding' in sd:
        raise UserError(f'{path} is a ResNet CLIP; only ViT CLIP models are supported, pass e.g. ViT-B/16')
    required = ('conv1.weight', 'class_embedding', 'positional_embedding', 'proj')
    if not all(isinstance(sd.get(k), torch.Tensor) for k in required):
        raise UserError(f'{path} is not a CLIP ViT checkpoint (no visual.conv1.weight/visual.proj keys); '
                        f'{CLIP_HINT}')
    return {k: v.float() for k, v in sd.items() if isinstance(v, torch.Tensor)}


def clip_visual_weights(name_or_path, cache_dir):
    """(the visual tower's fp32 tensors with OpenAI's `visual.` names minus the prefix, the file they came
    from) for an OpenAI model name (downloaded into cache_dir once) or a local file."""
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
    return _visual_state_dict(_read_state_dict(path), path), path
