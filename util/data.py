"""Image-folder datasets in the ImageNet layout, the pretraining augmentation, and the loader.

Images leave the workers as uint8 tensors (4x less to copy than float) and are normalised on the
training device by `to_device_normalized`."""
import contextlib
import functools
import io
import os
import random
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate, get_worker_info
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from util.distributed import all_reduce_sum, in_turn, rank, union_of_sets, world_size
from util.errors import LocalError, UserError
from util.preemption import ignore_stop_signals
from util.logger import log
from util.folders import MAX_NOTES, class_folders, class_images, folders_above, shown_notes, walk_images
from util.shards import ShardIndex, find_shards, say_once

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
# What PIL raises for a file that is not a readable image.
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def unreadable(path, error):
    return LocalError(f'cannot read image {path} ({error}); delete or replace the file')


def load_rgb(path):
    """Open an image as RGB; an unreadable file is a UserError naming it."""
    try:
        with open(path, 'rb') as f:
            return Image.open(f).convert('RGB')
    except READ_ERRORS as e:
        raise unreadable(path, e) from None


def decode_rgb(data, name):
    """An image file's bytes as RGB; unreadable ones are a UserError naming `name`."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert('RGB')
    except READ_ERRORS as e:
        raise unreadable(name, e) from None


PRETRAIN_SCALE = (0.2, 1.0)


def pretrain_transform(input_size):
    """SPEC 5: RandomResizedCrop (scale 0.2-1, bicubic) and horizontal flip; uint8 out."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=PRETRAIN_SCALE, interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.PILToTensor(),
    ])


def say_notes(notes, root):
    for line in shown_notes(notes, root, MAX_NOTES):
        say_once(line)


class FileSamples:
    """read and image for a dataset whose `samples` are (image file path, label)."""

    def read(self, i):
        with open(self.samples[i][0], 'rb') as f:
            return f.read()

    def image(self, i):
        return load_rgb(self.samples[i][0])


class ImageFiles(FileSamples, datasets.ImageFolder):
    """torchvision's ImageFolder (`root/<class>/<images>`, links followed) that also hands out a sample's file bytes
    (--gpu_decode) and its decoded image. Unlike ImageFolder it does not follow link loops, reads a folder reached
    by two links once, and refuses a folder in two classes, whose images would have two labels."""

    def __init__(self, root, **kwargs):
        self.notes = []
        super().__init__(root, **kwargs)
        say_notes(self.notes, root)

    def find_classes(self, directory):
        """ImageFolder's classes (sorted folder names) less the folders that are a loop (`self -> .`)."""
        classes = class_folders(directory, self.notes)
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {name: i for i, name in enumerate(classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """ImageFolder's samples, each class's folder walked by walk_images (util.folders.class_images)."""
        if is_valid_file is None:
            def is_valid_file(path):
                return path.lower().endswith(extensions if isinstance(extensions, str) else tuple(extensions))
        names = sorted(class_to_idx)
        samples, empty = [], []
        for name, paths in zip(names, class_images(directory, names, is_valid_file, self.notes)):
            samples += [(path, class_to_idx[name]) for path in paths]
            empty += [] if paths else [name]
        if empty and not allow_empty:  # torchvision's words
            raise FileNotFoundError(f'Found no valid file for the classes {", ".join(empty)}. ' + (
                f'Supported extensions are: {", ".join(extensions)}' if extensions else ''))
        return samples


class FlatImages(FileSamples, Dataset):
    """Every image file under `root`, searched recursively in sorted order (links followed, loops not), all
    labelled 0: unlabelled images for pretraining, which needs no classes."""

    def __init__(self, root, transform):
        self.root, self.transform, self.classes, notes = root, transform, ['images'], []
        paths = walk_images(root, lambda path: path.lower().endswith(IMAGE_EXTENSIONS), folders_above(root)[1:],
                            {}, notes)
        say_notes(notes, root)
        self.samples = [(path, 0) for path in paths]
        if not self.samples:
            raise UserError(f'no images under {root}; --data_path must hold images (in class folders or not), '
                            f'train/<class>/<images> or tar shards')

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.transform(self.image(i)), 0


class ShardImages(Dataset):
    """The samples of WebDataset tar shards (util.shards): images by random access, labels from `.cls`."""

    def __init__(self, shards, transform):
        with in_turn():  # each process indexes its share of the shards (cached), then all read the whole index
            if shards[rank()::world_size()]:
                ShardIndex(shards[rank()::world_size()])
        self.index = ShardIndex(shards)
        self.transform = transform
        self.root = os.path.dirname(shards[0]) if len(shards) > 1 else shards[0]
        self.samples = list(zip(self.index.names, self.index.labels))
        self.classes = self.index.classes

    def __len__(self):
        return len(self.index)

    def read(self, i):
        return self.index.read(i)

    def image(self, i):
        return decode_rgb(self.index.read(i), self.samples[i][0])

    def __getitem__(self, i):
        return self.transform(self.image(i)), self.samples[i][1]


def _has_images(folder):
    return any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(folder))


def image_folder(data_path, split, transform, labelled=True):
    """The `split` images of --data_path: tar shards (a brace pattern, .tar files, or a folder of them:
    util.shards.find_shards), else `data_path/split/<class>/<image>`; unlabelled (pretraining), also a folder
    of images without class folders (`data_path/split` or `data_path` itself). A one-line error saying what is
    missing; a log line saying which layout was found."""
    dataset = _open(data_path, split, transform, labelled)
    log(f'{split} data: {describe(dataset)}')
    return dataset


def describe(dataset):
    """The layout and size of a dataset, so that a log shows which of the layouts --data_path was taken as."""
    if isinstance(dataset, ShardImages):
        labels = f'{len(dataset.classes)} classes' if dataset.classes else 'unlabelled'
        count = len(dataset.index.shards)
        return f'{count} tar shard{"s" if count > 1 else ""} in {dataset.root}: {len(dataset)} images, {labels}'
    if isinstance(dataset, FlatImages):
        return f'folder of images without classes {dataset.root}: {len(dataset)} images'
    return f'image folder {dataset.root}: {len(dataset)} images in {len(dataset.classes)} classes'


def _open(data_path, split, transform, labelled):
    shards = find_shards(data_path, split)
    if shards:
        dataset = ShardImages(shards, transform)
        if labelled and min(dataset.samples, key=lambda s: s[1])[1] < 0:
            raise UserError(f'the {split} shards under {dataset.root} have samples without a .cls label (such as '
                            f'{min(dataset.samples, key=lambda s: s[1])[0]}); write them with tools/make_shards.py')
        return dataset
    root = os.path.join(data_path, split)
    if not labelled and not os.path.isdir(root) and os.path.isdir(data_path) and \
            not any(os.path.isdir(os.path.join(data_path, s)) for s in ('val', 'validation', 'test')):
        root = data_path  # unlabelled images need no split folder (but a val/ alone is no training set)
    if not os.path.isdir(root):
        raise UserError(f'no folder {root}: --data_path must hold {split}/<class>/<images> (the ImageNet layout)'
                        f'{"" if labelled else ", a folder of images, or tar shards"}')
    if not labelled and _has_images(root):
        return FlatImages(root, transform)
    try:
        return ImageFiles(root, transform=transform, loader=load_rgb)
    except FileNotFoundError as e:
        raise UserError(f'no images under {root} ({e}); --data_path must hold {split}/<class>/<images>') from None


def sample_seed(seed, epoch, index):
    """The augmentation seed of one sample in one epoch: a pure function, so the data a run sees does not
    depend on worker count, on the process a sample lands on, or on a restart mid-epoch."""
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729 + 0x5EED) % (2 ** 32)


@contextlib.contextmanager
def seeded_rng(seed):
    """Seed torch, numpy and random (all three drive torchvision/timm augmentations). In the main process
    (num_workers 0) their states are restored afterwards; a worker's own generators serve nothing else, so
    the costly save/restore is skipped there."""
    saved = None if get_worker_info() else (torch.get_rng_state(), np.random.get_state(), random.getstate())
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        if saved:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])


class TrainSet(Dataset):
    """An image folder indexed by (index, epoch): each sample's augmentation is seeded by sample_seed, and an
    unreadable image is replaced by the next readable one, its path reported with the batch."""

    MIN_LOOK_AHEAD = 32

    def __init__(self, folder, seed, max_bad_frac=0.1):
        self.folder, self.seed = folder, seed
        # as many unreadable images in a row as --max_bad_frac allows in all: bad files that sort together (a bad
        # copy of one folder) are common, and BadImages, not this, decides when there are too many
        self.look_ahead = min(len(folder), max(self.MIN_LOOK_AHEAD, int(max_bad_frac * len(folder)) + 1))

    def __len__(self):
        return len(self.folder)

    def load(self, i):
        """(augmented image, label) of sample i; runs under the sample's seeded RNG."""
        return self.folder[i]

    def __getitem__(self, key):
        index, epoch = key
        bad = []
        for offset in range(self.look_ahead):
            i = (index + offset) % len(self.folder)
            try:
                with seeded_rng(sample_seed(self.seed, epoch, i)):
                    image, label = self.load(i)
                return image, label, bad
            except UserError:
                bad.append(self.folder.samples[i][0])
        raise LocalError(f'{len(bad)} consecutive unreadable images from {bad[0]}; is {self.folder.root} a '
                         f'readable image folder?')


class EncodedImages(NamedTuple):
    data: list  # uint8 1-D tensors, the files' bytes
    crops: torch.Tensor  # [B, 5] int64: top, left, height, width, flip
    paths: list


class EncodedTrainSet(TrainSet):
    """TrainSet whose samples are (file bytes, crop and flip, path) instead of decoded images."""

    def __init__(self, folder, seed, input_size, max_bad_frac=0.1):
        super().__init__(folder, seed, max_bad_frac)
        self.input_size = input_size

    def load(self, i):
        path, label = self.folder.samples[i]
        try:
            data = self.folder.read(i)
            with Image.open(io.BytesIO(data)) as header:  # reads the size only
                top, left, h, w = RandomResizedCrop.get_params(header, list(PRETRAIN_SCALE), [3 / 4, 4 / 3])
        except READ_ERRORS as e:
            raise unreadable(path, e) from None
        flip = int(torch.rand(1) < 0.5)  # the same draw RandomHorizontalFlip makes, after the crop's
        return (torch.frombuffer(bytearray(data), dtype=torch.uint8), torch.tensor([top, left, h, w, flip]),
                path), label


def collate_encoded(batch):
    """(EncodedImages, labels, unreadable paths), like collate_train."""
    samples, labels, bad = zip(*batch)
    data, crops, paths = zip(*samples)
    return (EncodedImages(list(data), torch.stack(crops), list(paths)), default_collate(labels),
            [path for paths_ in bad for path in paths_])


def collate_train(batch):
    """(images, labels, paths of the unreadable images skipped for this batch)."""
    images, labels, bad = zip(*batch)
    return default_collate(images), default_collate(labels), [path for paths in bad for path in paths]


class TrainSampler(Sampler):
    """DistributedSampler's per-epoch shuffle, sharded over processes, yielding (index, epoch) keys for
    TrainSet; `set_epoch(epoch, start_batch)` resumes an epoch after its first start_batch batches."""

    def __init__(self, length, batch_size, seed):
        self.shard = DistributedSampler(range(length), num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed)
        self.batch_size = batch_size
        self.epoch = self.start = 0

    def set_epoch(self, epoch, start_batch=0):
        self.shard.set_epoch(epoch)
        self.epoch, self.start = epoch, start_batch * self.batch_size

    @property
    def batches_per_epoch(self):
        return len(self.shard) // self.batch_size

    def __iter__(self):
        return ((i, self.epoch) for i in list(self.shard)[self.start:])

    def __len__(self):
        return len(self.shard) - self.start


def init_worker(worker_id):
    """Each DataLoader worker is deaf to the stop signals (util.preemption). It already runs one torch thread
    (the DataLoader sees to that); the training process's threads are set in util.runtime.start."""
    ignore_stop_signals()


def train_loader(folder, batch_size, num_workers, pin_memory, seed, input_size=None, max_bad_frac=0.1):
    """Loader over a TrainSet with a TrainSampler (call `loader.sampler.set_epoch` every epoch); its own
    generator keeps it from drawing on the global RNG, which the training step's masking uses. With
    `input_size`, workers only read the files and draw the pretraining crops: the batch is decoded and
    augmented on the training device (util.device_decode)."""
    sampler = TrainSampler(len(folder), batch_size, seed)
    if sampler.batches_per_epoch < 1:
        raise UserError(f'the dataset has {len(folder)} images, fewer than one batch of {batch_size} per '
                        f'process x {world_size()} processes; lower --batch_size')
    dataset, collate = (TrainSet(folder, seed, max_bad_frac), collate_train) if input_size is None else \
        (EncodedTrainSet(folder, seed, input_size, max_bad_frac), collate_encoded)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate, pin_memory=pin_memory, drop_last=True,
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=init_worker)


class BadImages:
    """Unreadable training images met so far, by any process: each logged once by the process that met it;
    past max_frac of the data, the run stops. Processes meet the same bad file in different epochs, so
    they pool the paths themselves (counting per process would count one file up to world-size times)."""

    def __init__(self, dataset_size, max_frac):
        self.seen, self.new, self.size, self.max_frac = set(), set(), dataset_size, max_frac

    def add(self, paths):
        for path in paths:
            if path not in self.seen and path not in self.new:
                self.new.add(path)
                print(f'[rank {rank()}] skipping unreadable image {path}', flush=True)

    def check(self):
        """Collective: every process must call it at the same point. Paths are exchanged only when some
        process met a new one, so a clean dataset costs one number per check."""
        if all_reduce_sum(len(self.new)):
            self.seen |= union_of_sets(self.new)
        self.new.clear()
        total = len(self.seen)
        if total > self.max_frac * self.size:
            raise UserError(f'{total} of {self.size} training images are unreadable (such as {min(self.seen)}), '
                            f'more than --max_bad_frac {self.max_frac}; fix the dataset (the log names them) or '
                            f'raise --max_bad_frac')
        return total


@functools.lru_cache(maxsize=None)
def _channels(values, device, dtype=torch.float32):
    """A per-channel constant [1, 3, 1, 1] on `device`, made once: building it every step would be a
    blocking host-to-GPU copy per step."""
    return torch.tensor(values, device=device, dtype=dtype).view(1, 3, 1, 1)


def to_device_normalized(images, device, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 [B, 3, H, W] -> float32 on `device`, scaled to [0, 1] and normalised."""
    x = images.to(device, non_blocking=True).float().div_(255.0)
    return (x - _channels(mean, x.device)) / _channels(std, x.device)


def renormalize(x, src_mean, src_std, dst_mean, dst_std):
    """Change an image batch from one normalisation to another (e.g. ImageNet's to CLIP's)."""
    s_m, s_s, d_m, d_s = (_channels(v, x.device, x.dtype) for v in (src_mean, src_std, dst_mean, dst_std))
    return (x * s_s + s_m - d_m) / d_s


def finetune_transform(input_size, auto_augment, reprob, remode, recount):
    """MAE's fine-tuning augmentation from timm: RandomResizedCrop (bicubic), flip, RandAugment, normalise,
    random erasing (on the normalised tensor)."""
    from timm.data import create_transform
    return create_transform(input_size, is_training=True, color_jitter=None, auto_augment=auto_augment,
                            interpolation='bicubic', re_prob=reprob, re_mode=remode, re_count=recount,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)


def linprobe_transform(input_size):
    """The linear probe's light augmentation: RandomResizedCrop (bicubic) and flip."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_geometry(input_size):
    """Resize to input_size / 0.875 (bicubic) and centre crop: 224 -> 256 -> 224 as usual."""
    return [transforms.Resize(int(input_size / 0.875), interpolation=InterpolationMode.BICUBIC),
            transforms.CenterCrop(input_size)]


def eval_transform(input_size):
    """The evaluation geometry, then a normalised float tensor."""
    return transforms.Compose([*eval_geometry(input_size), transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class ShardSampler(torch.utils.data.Sampler):
    """Every rank-th index, in order, without padding: the shards cover the dataset exactly once, so summed
    counts over processes equal a single-process evaluation."""

    def __init__(self, length, rank, world_size):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def eval_loader(dataset, batch_size, num_workers, pin_memory, collate_fn=None):
    """Evaluation sharded exactly over the processes (each image counted once)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank(), world_size()),
                      num_workers=num_workers, pin_memory=pin_memory, drop_last=False, worker_init_fn=init_worker,
                      collate_fn=collate_fn)
