"""Checkpoints as plain dicts (tensors, numbers, strings, lists) that `torch.load(weights_only=True)`
reads, written atomically so a crash mid-write never destroys the last good one."""
import contextlib
import errno
import glob
import os
import re
import shutil

import torch

from util import rng
from util.atomic import atomic_file
from util.config import plain
from util.errors import UserError
from util.distributed import is_main
from util.logger import log
from util.pretrained import load_failure

LAST = 'checkpoint-last.pth'


def _space_error(path, needed):
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free
    size = f'about {needed / 2 ** 30:.2f} GiB' if needed else 'its size'
    kept = 'the last good checkpoint there is intact' if os.path.isfile(path) else 'nothing was written'
    return UserError(f'no space left in {folder} to write {os.path.basename(path)} (it needs {size}, '
                     f'{free / 2 ** 30:.2f} GiB are free); {kept}: free space or pass another --output_dir, then '
                     f'run the same command again')


def save_atomic(state, path):
    """Write to a temporary file beside `path`, flush it to disk, then rename over `path`. A disk too full for it
    (judged first from the size of the file it replaces) is one line, and the previous file stays intact."""
    needed = os.path.getsize(path) if os.path.isfile(path) else 0
    if needed and shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < needed:
        raise _space_error(path, needed)
    try:
        with atomic_file(path) as f:
            torch.save(state, f)
    except (OSError, RuntimeError) as e:  # torch's writer reports ENOSPC as a RuntimeError chained from it
        cause = e if isinstance(e, OSError) else e.__cause__ or e.__context__
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            raise _space_error(path, needed) from None
        raise


def latest_checkpoint(output_dir):
    """The newest checkpoint in output_dir (the rolling 'last' one, else the highest epoch), or None."""
    if not output_dir:
        return None
    last = os.path.join(output_dir, LAST)
    if os.path.isfile(last):
        return last
    numbered = []
    for path in glob.glob(os.path.join(output_dir, 'checkpoint-*.pth')):
        match = re.fullmatch(r'checkpoint-(\d+)\.pth', os.path.basename(path))
        if match:
            numbered.append((int(match.group(1)), path))
    return max(numbered)[1] if numbered else None


def load_checkpoint(path, kind):
    """Load a checkpoint of our own `kind` ('pretrain', 'finetune', ...) or explain why it can't be used."""
    if not os.path.isfile(path):
        raise UserError(f'checkpoint {path} does not exist; check --resume')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        if 'Namespace' in str(e):
            raise UserError(f'{path} is a released MAE/MILAN checkpoint, not a training state to resume: pass it '
                            f'to --finetune, or convert it with tools/checkpoint_tools.py import-mae') from None
        raise UserError(f'cannot read checkpoint {path} ({load_failure(e, path)}); it is truncated or not a '
                        f'checkpoint of this repository: point --resume at another file') from None
    if not isinstance(ckpt, dict) or ckpt.get('kind') != kind:
        found = ckpt.get('kind') if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f'checkpoint {path} is not a {kind} checkpoint of this repository (found {found!r}); '
                        f'point --resume at one written by the same script')
    return ckpt


def load_model_state(model, state, path):
    """Strict load that names the problem when the checkpoint holds another model."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f'checkpoint {path} holds a different model than the one asked for ({detail}); '
                        f'use the --model and flags it was trained with') from None


def load_optimizer_state(optimizer, state):
    """The checkpoint's moments and step counts, under this run's hyperparameters: load_state_dict would also
    bring back the saved weight decay, layer-decay scales and betas, silently overriding changed flags."""
    current = [{k: v for k, v in group.items() if k != 'params'} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    changed = set()
    for group, wanted in zip(optimizer.param_groups, current):
        changed |= {k for k, v in wanted.items() if k != 'lr' and group.get(k) != v}
        group.update(wanted)
    if changed:
        log(f'resumed with this run\'s optimizer settings, which differ from the checkpoint\'s: '
            f'{", ".join(sorted(changed))}')


def _newest_loadable(output_dir, kind, broken):
    """The newest numbered checkpoint in output_dir that loads, other than `broken`, or None."""
    numbered = []
    for path in glob.glob(os.path.join(output_dir, 'checkpoint-*.pth')):
        match = re.fullmatch(r'checkpoint-(\d+)\.pth', os.path.basename(path))
        if match and os.path.abspath(path) != os.path.abspath(broken):
            numbered.append((int(match.group(1)), path))
    for _, path in sorted(numbered, reverse=True):
        with contextlib.suppress(UserError):
            load_checkpoint(path, kind)
            return path
    return None


def find_resume(args, kind, same_flags=('model',)):
    """(path, checkpoint) to resume from (--resume or the newest in output_dir), or (None, None) for a new run;
    refused when its flags in `same_flags` differ from this run's, or when a mid-epoch state cannot be
    replayed. Cheap enough to call before anything is built, so a refusal comes first."""
    path = args.resume or latest_checkpoint(args.output_dir)
    if not path:
        return None, None
    try:
        ckpt = load_checkpoint(path, kind)
    except UserError as e:
        fallback = None if args.resume else _newest_loadable(args.output_dir, kind, path)
        if fallback is None:
            raise
        raise UserError(f'{e}; the newest numbered checkpoint that loads is {fallback}: resume from it with '
                        f'--resume {fallback}') from None
    if 'optimizer' not in ckpt:
        raise UserError(f'checkpoint {path} holds weights only; resume from checkpoint-last.pth in its folder')
    saved = ckpt.get('args', {})
    for flag in same_flags:
        if flag in saved and saved[flag] != getattr(args, flag):
            raise UserError(f'checkpoint {path} was trained with {_flag(flag, saved[flag])}, not '
                            f'{_flag(flag, getattr(args, flag))}; resume with the same flags, or pass another '
                            f'--output_dir to start a new run')
    resume_iter = ckpt.get('resume_iter', 0)
    same_layout = all(saved.get(k) == getattr(args, k) for k in ('world_size', 'batch_size', 'accum_iter', 'seed'))
    if resume_iter and not same_layout:
        raise UserError(f'checkpoint {path} was written mid-epoch by {saved.get("world_size")} processes x batch '
                        f'{saved.get("batch_size")} x accumulation {saved.get("accum_iter")} with --seed '
                        f'{saved.get("seed")}; resume with the same numbers to replay its data order')
    return path, ckpt


def resume_training(args, model, optimizer, scaler, kind, same_flags=('model',), found=None):
    """Restore model, optimizer, scaler and every process's RNG from `found` (find_resume's answer; looked up
    here when not given). Returns ((epoch, iteration) to start from, the checkpoint or None). A mid-epoch
    checkpoint continues inside its epoch."""
    path, ckpt = found or find_resume(args, kind, same_flags)
    if ckpt is None:
        return (args.start_epoch, 0), None
    resume_iter = ckpt.get('resume_iter', 0)
    load_model_state(model, ckpt['model'], path)
    load_optimizer_state(optimizer, ckpt['optimizer'])
    if ckpt.get('scaler'):
        scaler.load_state_dict(ckpt['scaler'])
    if ckpt.get('rng') and len(ckpt['rng']) == args.world_size:
        rng.restore_own(ckpt['rng'])
    else:
        log('the checkpoint has no random state for this number of processes: masks and augmentations from '
            'here on differ from an uninterrupted run')
    if resume_iter:
        log(f'resumed from {path}: epoch {ckpt["epoch"]} at iteration {resume_iter}')
        return (ckpt['epoch'], resume_iter), ckpt
    log(f'resumed from {path} (epoch {ckpt["epoch"]} done)')
    return (ckpt['epoch'] + 1, 0), ckpt


def _flag(name, value):
    """`--attn_mask on`, `--mask_ratio 0.75`."""
    return f'--{name} {("off", "on")[value] if isinstance(value, bool) else value}'


def save_training(args, epoch, model, optimizer, scaler, kind, resume_iter=0, extra=None, progress=None):
    """Checkpoint the run (a collective: every process contributes its RNG state; the main one writes).

    At an epoch's end (resume_iter 0): checkpoint-last.pth and checkpoint-{epoch}.pth, keeping the newest
    --keep_last numbered ones plus every --save_every-th and the final one. Mid-epoch (a stop request):
    checkpoint-last.pth alone, marked with the iteration to continue from and carrying the epoch's sums so far
    (`progress`, engine.EpochProgress as a dict)."""
    states = rng.capture_all()
    if not is_main() or not args.output_dir:
        return
    state = {'kind': kind, 'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
             'scaler': scaler.state_dict() if scaler.is_enabled() else None, 'epoch': epoch,
             'resume_iter': resume_iter, 'rng': states, 'args': plain(args), **(extra or {})}
    if resume_iter and progress:
        state['epoch_progress'] = progress
    last = os.path.join(args.output_dir, LAST)
    save_atomic(state, last)
    if resume_iter == 0:
        _copy(last, os.path.join(args.output_dir, f'checkpoint-{epoch}.pth'))
        _prune(args.output_dir, epoch, args.keep_last, args.save_every, args.epochs)


def _prune(output_dir, newest, keep_last, save_every, epochs):
    """Delete numbered checkpoints older than the newest keep_last, except every save_every-th and the final."""
    for path in glob.glob(os.path.join(output_dir, 'checkpoint-*.pth')):
        match = re.fullmatch(r'checkpoint-(\d+)\.pth', os.path.basename(path))
        if not match:
            continue
        epoch = int(match.group(1))
        if epoch <= newest - keep_last and (epoch + 1) % save_every != 0 and epoch + 1 != epochs:
            os.remove(path)


def _copy(src, dst):
    """The numbered checkpoint as a file of its own, not a second name for the last one: damage to the file a run
    resumes from must not also damage the history it falls back to."""
    try:
        with open(src, 'rb') as source, atomic_file(dst) as target:
            shutil.copyfileobj(source, target, 1 << 24)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise _space_error(dst, os.path.getsize(src)) from None
        raise
