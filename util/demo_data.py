"""A small labelled image-folder dataset of real JPEG files, generated once and cached, so every entry
point runs end to end with no dataset on disk.

Four classes told apart by shape or texture only: a disc, a square (one object each, at a random place and
size) and horizontal or vertical stripes filling the image. Every image draws its own two grey levels, either
one the brighter, so brightness and polarity, which dominate a random encoder's features, say nothing about the
class: a random encoder's k-NN starts well below 100% and pretraining raises it (the demo's k-NN monitor),
while fine-tuning and linear probing still clearly beat chance in a few CPU epochs. (Random hues as well would
be harder still, but then the demo's random CLIP teacher's features are mostly hue and its k-NN stays at
chance.)"""
import contextlib
import fcntl
import glob
import os

import numpy as np
from PIL import Image

from util.config import demo_data_root
from util.errors import UserError
from util.logger import log

CLASSES = ('disc', 'square', 'hstripes', 'vstripes')
TRAIN_PER_CLASS = 64
VAL_PER_CLASS = 32  # 128 validation images: the k-NN monitor's accuracy moves in steps of 0.78%, not 1.56%
DONE = 'COMPLETE'
# The marker's first line: a cache written by another version of this file (or with other counts) is redrawn.
VERSION = 'util/demo_data.py v2: grey shapes and stripes'

MIN_CONTRAST = 0.2  # the two grey levels differ by at least this (of 1); lower makes the k-NN start lower


def _grey_pair(rng):
    """(background, foreground) grey levels in [0.1, 0.9], at least MIN_CONTRAST apart, in random order."""
    while True:
        bg, fg = rng.uniform(0.1, 0.9, 2)
        if abs(bg - fg) >= MIN_CONTRAST:
            return bg, fg


def _mask(kind, rng, w, h):
    """[h, w] bool: where the foreground grey goes."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind in ('hstripes', 'vstripes'):
        period = rng.uniform(6, 14)
        t = yy if kind == 'hstripes' else xx
        return (t + rng.uniform(0, period)) % period < period / 2
    size = rng.uniform(1 / 3, 3 / 4) * min(w, h)
    cx, cy = rng.uniform(size / 2, w - size / 2), rng.uniform(size / 2, h - size / 2)
    if kind == 'disc':
        return np.hypot(xx - cx, yy - cy) < size / 2
    return (np.abs(xx - cx) < size / 2) & (np.abs(yy - cy) < size / 2)


def _draw(label, rng):
    w, h = int(rng.integers(72, 113)), int(rng.integers(72, 113))
    bg, fg = _grey_pair(rng)
    img = np.where(_mask(CLASSES[label], rng, w, h)[..., None], fg, bg) * 255 + rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _stamp(seed, train_per_class, val_per_class):
    return f'{VERSION}\nseed {seed}, {train_per_class} train and {val_per_class} val images per class\n'


def _complete(marker, stamp):
    try:
        with open(marker) as f:
            return f.read() == stamp
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _exclusive(root):
    """Hold an exclusive lock on root + '.lock' for the block, or, where the file system gives none (NFS mounted
    without locking, a read-only cache), go on without it, with a line: the drawing is deterministic."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
        lock = open(os.path.abspath(root) + '.lock', 'a')
    except OSError as e:
        log(f'note: cannot create the demo data lock beside {root} ({e.strerror}); drawing without it')
        yield
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        except OSError as e:
            log(f'note: the file system of {root} does not lock files ({e.strerror}); drawing without a lock')
        yield


def ensure_demo_dataset(root=None, seed=0, train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS):
    """Create root/{train,val}/<class>/*.JPEG unless a complete copy of this version is already there; returns
    root. An older or other copy is replaced (its generated files removed first, so none is left over).

    Every process of a torchrun job calls this: an exclusive lock (_exclusive) lets one of them draw while the
    others wait, so none reads a half-written cache or deletes files another is reading."""
    root = root or demo_data_root()
    marker, stamp = os.path.join(root, DONE), _stamp(seed, train_per_class, val_per_class)
    if _complete(marker, stamp):
        return root
    with _exclusive(root):
        if _complete(marker, stamp):  # drawn by another process while this one waited
            return root
        try:
            _draw_all(root, marker, stamp, seed, train_per_class, val_per_class)
        except OSError as e:
            raise UserError(f'cannot write the demo images under {root} ({e.strerror}); point XDG_CACHE_HOME at a '
                            f'writable folder, or pass --data_path') from None
    return root


def _draw_all(root, marker, stamp, seed, train_per_class, val_per_class):
    if os.path.isfile(marker):
        os.remove(marker)
    rng = np.random.default_rng(seed)
    for split, count in (('train', train_per_class), ('val', val_per_class)):
        for label, kind in enumerate(CLASSES):
            folder = os.path.join(root, split, kind)
            os.makedirs(folder, exist_ok=True)
            for stale in glob.glob(os.path.join(folder, f'{kind}_[0-9][0-9][0-9][0-9].JPEG')):
                os.remove(stale)
            for i in range(count):
                _draw(label, rng).save(os.path.join(folder, f'{kind}_{i:04d}.JPEG'), quality=90)
    with open(marker, 'w') as f:
        f.write(stamp)
