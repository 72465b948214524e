"""Write an ImageNet-layout image folder as WebDataset tar shards, which util.shards reads at random: a few large
files copy and read far faster than a million small ones on cluster file systems.

    python -m tools.make_shards DATA/train OUT --shard_size 1000
    python tools/make_shards.py DATA/val OUT

Shards are OUT/<prefix>-000000.tar, ... (prefix: the source folder's name, so train and val shards can share
OUT). Each image is stored with its original bytes (no re-encoding) as `{key}.{ext}` beside `{key}.cls`, its
class index as text; OUT/classes.json lists the class names in index order. Classes, labels and sample order are
torchvision ImageFolder's (sorted class folders, sorted files), so the shards give the same dataset as the folder,
augmentation seeds included; --shuffle_seed writes them in a seeded shuffled order instead.
"""
import argparse
import io
import json
import os
import random
import re
import sys
import tarfile
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python tools/make_shards.py`: make the repository's modules importable
    sys.path.insert(0, ROOT)

from util.atomic import atomic_file  # noqa: E402
from util.errors import UserError, check, one_line  # noqa: E402
from util.folders import MAX_NOTES, class_folders, class_images, shown_notes  # noqa: E402

# Neither torch nor torchvision is imported: the tool runs wherever Python does (a storage node) and starts at once.
# torchvision ImageFolder's extensions; tests/test_make_shards.py checks them and image_folder against it.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


def image_folder(src: str, notes: Optional[list] = None) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(image path, label)]) as util.data's ImageFiles, and so torchvision ImageFolder, finds them: sorted
    class folders, each one's images (links followed) by sorted folder and file name; like ImageFolder, a class
    without images is an error. Unlike ImageFolder it does not follow link loops (`self -> .`: os.walk would write
    the images dozens of times) and reads a folder reached by two links once (util.folders), adding a line to
    `notes` for each; a folder in two classes is an error, as in training from the folder."""
    notes = [] if notes is None else notes
    check(os.path.isdir(src), f'no folder {src}: pass an image folder holding <class>/<images> (e.g. DATA/train)')
    classes = class_folders(src, notes)
    check(classes, f'no class folders in {src}: pass an image folder holding <class>/<images> (e.g. DATA/train)')
    samples = []
    for label, (name, paths) in enumerate(zip(classes, class_images(src, classes, is_image, notes))):
        check(paths, f'no images ({", ".join(IMAGE_EXTENSIONS)}) in class folder {os.path.join(src, name)}; add '
                     f'some or remove the folder')
        samples += [(path, label) for path in paths]
    return classes, samples


def is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def member_key(position: int, width: int, path: str, class_name: str) -> str:
    """A WebDataset key: the write position (unique, and sorting as written), class folder and file stem, with
    every character but letters, digits, '_' and '-' replaced (a dot would end the key)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return re.sub(r'[^A-Za-z0-9_-]', '_', f'{position:0{width}d}_{class_name}_{stem}')


def extension(path: str) -> str:
    ext = os.path.splitext(path)[1][1:].lower()
    return 'jpg' if ext == 'jpeg' else ext


def _tar_info(name, size, mtime):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    return info


def write_shard(path: str, samples: list, start: int, width: int, classes: list) -> int:
    """Write `samples` [(image path, label)] as one shard, through a temporary file renamed over `path` (a shard
    that exists is complete); returns its size in bytes."""
    with atomic_file(path) as f, tarfile.open(fileobj=f, mode='w', format=tarfile.PAX_FORMAT) as tar:
        for position, (image, label) in enumerate(samples, start):
            with open(image, 'rb') as src:
                data = src.read()
            mtime = int(os.path.getmtime(image))
            key = member_key(position, width, image, classes[label])
            tar.addfile(_tar_info(f'{key}.{extension(image)}', len(data), mtime), io.BytesIO(data))
            text = str(label).encode()
            tar.addfile(_tar_info(f'{key}.cls', len(text), mtime), io.BytesIO(text))
    return os.path.getsize(path)


def _write_classes(out, classes):
    """OUT/classes.json; shards of another split already there must have the same classes, or labels would
    mean different classes in the two."""
    path = os.path.join(out, 'classes.json')
    if os.path.isfile(path):
        with open(path) as f:
            existing = json.load(f)
        check(existing == classes, f'{path} lists other classes ({len(existing)}) than this folder ({len(classes)}); '
                                   f'write these shards to another folder')
    else:
        with open(path, 'w') as f:
            json.dump(classes, f, indent=1)
    return path


def make_shards(src: str, out: str, shard_size: int = 1000, prefix: Optional[str] = None,
                shuffle_seed: Optional[int] = None) -> list[str]:
    """Write the image folder `src` (<class>/<images>) as shards in `out`; returns the shard paths."""
    check(shard_size >= 1, f'--shard_size must be at least 1, got {shard_size}')
    notes = []
    classes, samples = image_folder(src, notes)
    for line in shown_notes(notes, src, MAX_NOTES):
        print(line, flush=True)
    prefix = prefix or os.path.basename(os.path.normpath(os.path.abspath(src)))
    check(prefix and '/' not in prefix, f'--prefix {prefix!r} must be a non-empty file name')
    if os.path.isfile(out):
        raise UserError(f'{out} is a file; pass a folder for the shards')
    os.makedirs(out, exist_ok=True)
    stale = sorted(name for name in os.listdir(out) if name.startswith(f'{prefix}-') and name.endswith('.tar'))
    if stale:
        raise UserError(f'{out} already holds {len(stale)} {prefix}-*.tar shards (such as {stale[0]}); delete them or '
                        f'pass another folder or --prefix')
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(samples)
    classes_path = _write_classes(out, classes)
    width = max(6, len(str(len(samples))))
    shards, total_bytes = [], 0
    for k, start in enumerate(range(0, len(samples), shard_size)):
        path = os.path.join(out, f'{prefix}-{k:06d}.tar')
        chunk = samples[start:start + shard_size]
        size = write_shard(path, chunk, start, width, classes)
        total_bytes += size
        shards.append(path)
        print(f'wrote {path}: {len(chunk)} images, {size / 2 ** 20:.1f} MiB', flush=True)
    order = 'folder order' if shuffle_seed is None else f'shuffled with seed {shuffle_seed}'
    print(f'{len(samples)} images of {len(classes)} classes from {src} in {len(shards)} shards '
          f'({total_bytes / 2 ** 20:.1f} MiB, {order}) in {out}; class names in {classes_path}')
    return shards


def get_args_parser():
    parser = argparse.ArgumentParser('make_shards', description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='an image folder holding <class>/<images>, e.g. DATA/train')
    parser.add_argument('out', help='the folder to write the shards and classes.json to')
    parser.add_argument('--shard_size', type=int, default=1000, help='images per shard (default 1000)')
    parser.add_argument('--prefix', default=None, help="shard file names' prefix (default: the name of src)")
    parser.add_argument('--shuffle_seed', type=int, default=None,
                        help="write the samples in this seed's shuffled order (default: the folder's order, which "
                             "keeps each sample's index, and so its augmentation, the folder's)")
    return parser


def main(argv=None):
    """One line and exit code 2 for a user error, as the entry points end (util.cli.run, which this tool does not
    import: it would import torch)."""
    args = get_args_parser().parse_args(argv)
    try:
        make_shards(args.src, args.out, args.shard_size, args.prefix, args.shuffle_seed)
    except UserError as e:
        print(f'error: {one_line(e)}', file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print('error: interrupted: the shards already written are complete, the one being written was discarded',
              file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == '__main__':
    main()
