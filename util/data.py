"""Image-folder datasets in the ImageNet layout, the pretraining augmentation, and the loader.

Images leave the workers as uint8 tensors (4x less to copy than float) and are normalised on the
training device by `to_device_normalized`."""
import os

import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from util.cli import UserError
from util.distributed import rank, world_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_rgb(path):
    """Open an image as RGB; an unreadable file is a UserError naming it."""
    try:
        with open(path, 'rb') as f:
            return Image.open(f).convert('RGB')
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f'cannot read image {path} ({e}); delete or replace the file') from None


def pretrain_transform(input_size):
    """SPEC 5: RandomResizedCrop (scale 0.2-1, bicubic) and horizontal flip; uint8 out."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.PILToTensor(),
    ])


def image_folder(data_path, split, transform):
    """`data_path/split/<class>/<image>` as a dataset, or a one-line error saying what is missing."""
    root = os.path.join(data_path, split)
    if not os.path.isdir(root):
        raise UserError(f'no folder {root}: --data_path must hold {split}/<class>/<images> (the ImageNet layout)')
    try:
        return datasets.ImageFolder(root, transform=transform, loader=load_rgb)
    except FileNotFoundError as e:
        raise UserError(f'no images under {root} ({e}); --data_path must hold {split}/<class>/<images>') from None


def train_loader(dataset, batch_size, num_workers, pin_memory, seed, drop_last=True):
    """A loader whose DistributedSampler gives each process a different shard of a per-epoch shuffle
    (call `loader.sampler.set_epoch(epoch)` every epoch); it works unchanged in a single process."""
    sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed)
    if len(sampler) < batch_size:
        raise UserError(f'the dataset has {len(dataset)} images, fewer than one batch of {batch_size} per '
                        f'process x {world_size()} processes; lower --batch_size')
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=drop_last, persistent_workers=num_workers > 0)


def to_device_normalized(images, device, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 [B, 3, H, W] -> float32 on `device`, scaled to [0, 1] and normalised."""
    x = images.to(device, non_blocking=True).float().div_(255.0)
    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def renormalize(x, src_mean, src_std, dst_mean, dst_std):
    """Change an image batch from one normalisation to another (e.g. ImageNet's to CLIP's)."""
    shape = (1, 3, 1, 1)
    s_m, s_s, d_m, d_s = (torch.tensor(v, device=x.device, dtype=x.dtype).view(shape)
                          for v in (src_mean, src_std, dst_mean, dst_std))
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


def eval_transform(input_size):
    """Resize to input_size / 0.875 (bicubic), centre crop, normalise; 224 -> 256 -> 224 as usual."""
    return transforms.Compose([
        transforms.Resize(int(input_size / 0.875), interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class ShardSampler(torch.utils.data.Sampler):
    """Every rank-th index, in order, without padding: the shards cover the dataset exactly once, so summed
    counts over processes equal a single-process evaluation."""

    def __init__(self, length, rank, world_size):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def eval_loader(dataset, batch_size, num_workers, pin_memory):
    """Evaluation sharded exactly over the processes (each image counted once)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank(), world_size()),
                      num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=False)
