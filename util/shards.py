"""Random access to WebDataset-layout tar shards, so a dataset copied as a few large files (one per 1000 images,
say) trains exactly like the image folder it was made from: the same samples, labels and order.

A sample is the members `{key}.{ext}` of one shard that share a key (the member name up to the first dot of its
base name, as WebDataset splits it): one image (`.jpg`, `.png`, ... any case) and optionally `{key}.cls`, the class
index as text; other members are ignored. Each shard's tar headers are scanned once and the image members' data
offsets cached as JSON (`<shard>.idx.json`, or under the user's cache folder when the shard's folder is read-only),
so opening a dataset later reads one small file per shard, and an image is one `pread`."""
import collections
import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import resource
import tarfile
from typing import Optional

import numpy as np

from util.atomic import atomic_file
from util.config import cache_dir
from util.errors import UserError
from util.folders import folders_above, identity, link_text, loop_note
from util.logger import log

# torchvision ImageFolder's extensions: tools/make_shards.py writes whatever an image folder holds
IMAGE_EXTENSIONS = frozenset(('jpg', 'jpeg', 'png', 'ppm', 'bmp', 'pgm', 'tif', 'tiff', 'webp'))
INDEX_FORMAT = 1
END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE  # the two zero blocks every tar writer ends with
def _open_file_budget():
    """Shard files a process keeps open: random access touches every shard, so as many as the open-file limit
    allows (raised to its hard maximum), leaving half of it to everything else; reopening a shard per image would
    cost a metadata round trip on a network file system."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 65536 if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY:
        return target // 2
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return max(64, soft // 2)


MAX_OPEN_SHARDS = _open_file_budget()
INDEX_THREADS = 8  # the header scan waits on the disk (or network file system), not on the CPU
SPLIT_NAMES = {'val': ('val', 'validation'), 'validation': ('val', 'validation')}
KNOWN_SPLITS = ('train', 'val', 'validation', 'test')


# Lines about folders reached by links -------------------------------------------------------------------------

_SAID = set()


def say_once(line):
    """Log a line about the data once per process: a dataset is opened more than once (training, k-NN monitor)."""
    if line not in _SAID:
        _SAID.add(line)
        log(line)


# Shard paths ---------------------------------------------------------------------------------------------

def _brace_group(pattern):
    """(start, end) of the first outermost {...} group, or None."""
    depth, start = 0, None
    for i, ch in enumerate(pattern):
        if ch == '{':
            start = i if depth == 0 else start
            depth += 1
        elif ch == '}' and depth:
            depth -= 1
            if depth == 0:
                return start, i
    return None


def _split_top_level(body):
    parts, depth, last = [], 0, 0
    for i, ch in enumerate(body):
        depth += (ch == '{') - (ch == '}')
        if ch == ',' and depth == 0:
            parts.append(body[last:i])
            last = i + 1
    return parts + [body[last:]]


def _numeric_range(body):
    match = re.fullmatch(r'(-?\d+)\.\.(-?\d+)', body)
    if not match:
        return None
    first, last = match.groups()
    padded = any(len(s.lstrip('-')) > 1 and s.lstrip('-').startswith('0') for s in (first, last))
    width = max(len(first), len(last)) if padded else 0
    a, b = int(first), int(last)
    step = 1 if b >= a else -1
    return [f'{n:0{width}d}' for n in range(a, b + step, step)]


def expand(pattern: str) -> list[str]:
    """Brace expansion as WebDataset (braceexpand) writes shard lists: `{0000..1023}` (zero padding kept),
    `{a,b}`, several groups and nested ones; a group that is neither (`{x}`) is literal, as in the shell."""
    group = _brace_group(pattern)
    if group is None:
        return [pattern]
    start, end = group
    head, body, tail = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
    alternatives = _numeric_range(body)
    if alternatives is None:
        parts = _split_top_level(body)
        if len(parts) == 1:  # literal braces: expand what follows them only
            return [head + '{' + body + '}' + rest for rest in expand(tail)]
        alternatives = [word for part in parts for word in expand(part)]
    return [head + word + rest for word in alternatives for rest in expand(tail)]


def _natural_key(path):
    return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', path)]


def _tars(folder):
    return sorted((os.path.join(folder, name) for name in os.listdir(folder)
                   if name.endswith('.tar') and os.path.isfile(os.path.join(folder, name))), key=_natural_key)


def _names_split(filename, split):
    """Whether `split` is a word of the file name: `imagenet1k-train-0000.tar` names train, `pretrain.tar` not."""
    return re.search(rf'(?<![a-z]){re.escape(split)}(?![a-z])', filename.lower()) is not None


def _holds_images(folder):
    """An image folder (class folders, or images) that may also hold a stray .tar: ImageNet's val/ often keeps
    ILSVRC2012_img_val.tar beside the extracted images. Such a folder is read as images, never as shards. A link
    loop (`self -> .`) is no sub-folder: it would make a folder of shards an image folder."""
    above = None
    for entry in os.scandir(folder):
        if entry.is_dir():
            above = above or dict(folders_above(folder))
            with contextlib.suppress(OSError):
                key = identity(entry.stat())
                if key in above:
                    say_once(loop_note(entry.path, above[key]))
                    continue
            return True
        if entry.name.lower().rsplit('.', 1)[-1] in IMAGE_EXTENSIONS:
            return True
    return False


def _named_shards(pattern, split, names):
    """The shards a pattern or file names, for `split`: as named for 'train'; for another split only when the
    pattern names that split, or names 'train' and the same pattern with the split's name finds shards, so that
    evaluation never silently runs on the training images."""
    if split != 'train' and not any(_names_split(os.path.basename(pattern), name) for name in names):
        candidates = [re.sub(r'(?<![a-z])train(?![a-z])', name, pattern) for name in names]
        found = next((c for c in candidates if c != pattern and all(os.path.isfile(p) for p in expand(c))), None)
        if found is None:
            raise UserError(f'--data_path {pattern} names training shards, and no {split} shards were found beside '
                            f'them; put both splits in one folder (train-*.tar, {split}-*.tar) and pass the folder')
        pattern = found
    shards = expand(pattern)
    missing = next((path for path in shards if not os.path.isfile(path)), None)
    if missing:
        raise UserError(f'no shard {missing} (of the {len(shards)} that {pattern} names); fix the pattern or '
                        f'copy the missing shards')
    return shards


def find_shards(data_path: str, split: str) -> Optional[list[str]]:
    """The shard files of `split`, or None when data_path is no shard source (an image folder, or nothing):
    - a brace pattern (`shards/train-{0000..0146}.tar`) or one .tar file: those shards for 'train'; for another
      split the pattern must name it, or name 'train' with the split's shards beside (`val-{...}.tar`);
    - a folder holding images or sub-folders is an image folder, even with a .tar in it;
    - a folder `data_path/<split>/` holding *.tar: those; 'val' also looks in `validation/`;
    - a folder holding *.tar whose names hold the split as a word (`imagenet1k-train-0000.tar`; 'val' also
      matches `validation`, as timm's imagenet-1k-wds names it): those;
    - a folder holding *.tar of which none names a split: all of them for 'train' (the shards of one
      dataset), and a UserError for another split, which would otherwise silently be the training images.
    Folders' shards come in natural order (`x-2.tar` before `x-10.tar`); a pattern's in its own order."""
    names = SPLIT_NAMES.get(split, (split,))
    if '{' in data_path or os.path.isfile(data_path):
        if not data_path.endswith('.tar') and '{' not in data_path:
            return None
        return _named_shards(data_path, split, names)
    if not os.path.isdir(data_path):
        return None
    for name in names:
        folder = os.path.join(data_path, name)
        if os.path.isdir(folder):
            return None if _holds_images(folder) else (_tars(folder) or None)
    tars = _tars(data_path)
    if not tars or _holds_images(data_path):
        return None
    named = [path for path in tars if any(_names_split(os.path.basename(path), name) for name in names)]
    if named:
        return named
    if split == 'train' and not any(_names_split(os.path.basename(path), name)
                                    for path in tars for name in KNOWN_SPLITS):
        return tars
    raise UserError(f'{data_path} holds {len(tars)} .tar shards but none for split {split!r}: put its shards in '
                    f'{os.path.join(data_path, split)}/ or name them {split}-000000.tar, ...')


# The index of one shard ------------------------------------------------------------------------------------

def _split_key(member):
    """(key, extension) as WebDataset splits a member name: the extension starts at the base name's first dot."""
    directory, _, base = member.rpartition('/')
    stem, dot, ext = base.partition('.')
    if not stem or not dot:
        return None, None
    return (f'{directory}/{stem}' if directory else stem), ext


def _truncated(shard, detail):
    return UserError(f'shard {shard} is truncated ({detail}); re-copy or re-create it')


def _read_label(tar, info, shard):
    text = tar.extractfile(info).read().decode('ascii', 'replace').strip()
    if not re.fullmatch(r'\d+', text):
        raise UserError(f'shard {shard}: member {info.name} holds {text[:20]!r}, not a class index; re-create the '
                        f'shard (tools/make_shards.py writes the class index as text)')
    return int(text)


def scan_shard(shard: str) -> list:
    """[member name, data offset, size, label or -1] of each image member in member order, from the tar headers;
    a UserError naming the shard when it is truncated, no tar, holds no image or two images for one key."""
    size = os.path.getsize(shard)
    samples, by_key, labels, end = [], {}, {}, 0
    try:
        tar = tarfile.open(shard, 'r:')
    except tarfile.ReadError as e:
        raise UserError(f'shard {shard} is not an uncompressed tar file ({e}); re-create it '
                        f'(tools/make_shards.py writes them)') from None
    with tar:
        try:
            for info in tar:
                if info.offset_data + info.size > size:
                    raise _truncated(shard, f'member {info.name} needs bytes up to {info.offset_data + info.size}, '
                                            f'the file has {size}')
                end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                key, ext = _split_key(info.name)
                if not info.isfile() or key is None:
                    continue
                ext = ext.lower()
                if ext in IMAGE_EXTENSIONS:
                    if key in by_key:
                        raise UserError(f'shard {shard}: sample {key} has two images, {samples[by_key[key]][0]} and '
                                        f'{info.name}; re-create the shard with one image per key')
                    by_key[key] = len(samples)
                    samples.append([info.name, info.offset_data, info.size, -1])
                elif ext == 'cls':
                    labels[key] = _read_label(tar, info, shard)
        except tarfile.ReadError as e:
            raise _truncated(shard, str(e)) from None
    if size - end < END_OF_ARCHIVE:
        raise _truncated(shard, f'it ends at byte {size} without the end-of-archive blocks')
    with open(shard, 'rb') as f:
        f.seek(end)
        if f.read(tarfile.BLOCKSIZE).strip(b'\0'):
            raise UserError(f'shard {shard} is damaged: no valid tar header at byte {end}; re-copy or re-create it')
    if not samples:
        raise UserError(f'shard {shard} holds no image members ({", ".join(sorted(IMAGE_EXTENSIONS))}); is it a '
                        f'shard of images?')
    for key, label in labels.items():
        if key in by_key:
            samples[by_key[key]][3] = label
    return samples


def _stamp(shard):
    st = os.stat(shard)
    return {'size': st.st_size, 'mtime_ns': st.st_mtime_ns}


def index_paths(shard: str) -> tuple[str, str]:
    """Where a shard's index is cached: beside it, and in the user's cache (for shards in read-only folders),
    under a name derived from the shard's absolute path."""
    path = os.path.abspath(shard)
    digest = hashlib.sha1(path.encode()).hexdigest()[:16]
    return (f'{shard}.idx.json',
            os.path.join(cache_dir('milan'), 'shard_index', f'{digest}-{os.path.basename(path)}.idx.json'))


def _cached(shard):
    """The cached samples of a shard, or None when no cache matches its current size and mtime."""
    stamp = _stamp(shard)
    for path in index_paths(shard):
        try:
            with open(path) as f:
                index = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(index, dict) and index.get('format') == INDEX_FORMAT and \
                all(index.get(k) == v for k, v in stamp.items()):
            return index['samples']
    return None


def _build(shard):
    """Scan a shard and cache its index beside it, else in the user's cache, else (both unwritable) nowhere."""
    stamp = _stamp(shard)
    samples = scan_shard(shard)
    text = json.dumps({'format': INDEX_FORMAT, **stamp, 'samples': samples})
    beside, fallback = index_paths(shard)
    try:
        with atomic_file(beside, 'w') as f:
            f.write(text)
    except OSError:
        try:
            os.makedirs(os.path.dirname(fallback), exist_ok=True)
            with atomic_file(fallback, 'w') as f:
                f.write(text)
        except OSError as e:
            log(f'warning: cannot cache the index of {shard} ({e.strerror}): it is scanned again next time')
    return samples


# The dataset's index ------------------------------------------------------------------------------------------

class ShardIndex:
    """The image samples of a list of shards, in shard order then member order, each readable by its index:
    `names[i]` ("<shard>/<member>"), `labels[i]` (-1 without a .cls member), `read(i)` (the image file's
    bytes, undecoded: a corrupt image is the decoder's to skip), `classes`.

    Open shard files are kept per process (at most MAX_OPEN_SHARDS, least recently used closed first): a
    DataLoader worker forked from a process that had read must not share its files."""

    def __init__(self, shards: list[str]):
        if not shards:
            raise UserError('no shards given; pass shard files, a brace pattern or a folder of .tar shards')
        first = {}
        for path in shards:  # by the file itself: a link to a shard beside it would count its samples twice
            key = identity(os.stat(path))
            if key in first:
                raise UserError(f'shard {path} is listed twice' + (
                    f' ({link_text(path)} is {first[key]})' if first[key] != path else '') + '; list each shard once')
            first[key] = path
        self.shards = list(shards)
        per_shard = [_cached(shard) for shard in shards]
        todo = [k for k, samples in enumerate(per_shard) if samples is None]
        if todo:
            log(f'indexing {len(todo)} of {len(shards)} shards (once: the index is cached beside each shard)')
            with concurrent.futures.ThreadPoolExecutor(min(INDEX_THREADS, len(todo))) as pool:
                for k, samples in zip(todo, pool.map(_build, [shards[k] for k in todo])):
                    per_shard[k] = samples
        self.names = [f'{shard}/{member}' for shard, samples in zip(shards, per_shard) for member, *_ in samples]
        self.labels = [label for samples in per_shard for *_, label in samples]
        self._shard = np.concatenate([np.full(len(s), k, dtype=np.int32) for k, s in enumerate(per_shard)])
        self._offset = np.array([offset for samples in per_shard for _, offset, _, _ in samples], dtype=np.int64)
        self._size = np.array([size for samples in per_shard for _, _, size, _ in samples], dtype=np.int64)
        self.classes = self._classes()
        self._pid, self._files = None, collections.OrderedDict()

    def _classes(self):
        """classes.json beside the (first) shard, as tools/make_shards.py writes it, else '0'..'K-1'."""
        path = os.path.join(os.path.dirname(self.shards[0]), 'classes.json')
        if not os.path.isfile(path):
            return [str(k) for k in range(max(self.labels) + 1)]
        try:
            with open(path) as f:
                classes = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f'cannot read {path} ({e}); it must be a JSON list of class names') from None
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise UserError(f'{path} is not a JSON list of class names; fix it or delete it')
        if max(self.labels) >= len(classes):
            i = int(np.argmax(self.labels))
            raise UserError(f'{self.names[i]} has class index {self.labels[i]} but {path} names {len(classes)} '
                            f'classes; the shards and classes.json do not belong together')
        return classes

    def __len__(self):
        return len(self.names)

    def _file(self, shard):
        if self._pid != os.getpid():  # a new process (forked worker): the inherited descriptors stay the parent's
            self._pid, self._files = os.getpid(), collections.OrderedDict()
        fd = self._files.get(shard)
        if fd is None:
            if len(self._files) >= MAX_OPEN_SHARDS:
                os.close(self._files.popitem(last=False)[1])
            fd = self._files[shard] = os.open(self.shards[shard], os.O_RDONLY)
        else:
            self._files.move_to_end(shard)
        return fd

    def read(self, i: int) -> bytes:
        """The bytes of sample i's image member: one positioned read, which moves no shared file offset."""
        return os.pread(self._file(int(self._shard[i])), int(self._size[i]), int(self._offset[i]))

    def __getstate__(self):
        """Pickled (DataLoader workers under spawn): without this process's open files."""
        state = dict(self.__dict__)
        state['_pid'], state['_files'] = None, collections.OrderedDict()
        return state
