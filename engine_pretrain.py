"""The pretraining step, from a loader batch to its loss: decode on the device under --gpu_decode, normalise,
then the method (models_milan.batch_loss)."""
from typing import Optional

import torch

from models_milan import batch_loss as method_loss
from util.data import BadImages, EncodedImages, to_device_normalized
from util.device_decode import decode_on_device


def pretrain_loss(model: torch.nn.Module, teacher: Optional[torch.nn.Module], images: torch.Tensor, args,
                  device: torch.device) -> torch.Tensor:
    """The loss of one uint8 batch, normalised on the device, by the method the flags name (mask_ratio,
    attn_mask, teacher_input_norm)."""
    return method_loss(model, teacher, to_device_normalized(images, device), args.mask_ratio, args.attn_mask,
                       args.teacher_input_norm).loss


def batch_loss(model: torch.nn.Module, teacher: Optional[torch.nn.Module], batch, args, device: torch.device,
               bad_images: Optional[BadImages] = None) -> torch.Tensor:
    """engine.train_epoch's step: `batch` is train_loader's (images, labels, unreadable paths); under
    --gpu_decode its images are still JPEG bytes, and those the device cannot decode count as unreadable."""
    images = batch[0]
    if isinstance(images, EncodedImages):
        images, unreadable = decode_on_device(images, device, args.input_size)
        if bad_images is not None:
            bad_images.add(unreadable)
    return pretrain_loss(model, teacher, images, args, device)
