"""Pretraining input decoded on the training device (`--gpu_decode`): workers only read the JPEG bytes and draw
each image's crop and flip (util.data.EncodedTrainSet), so a handful of CPU cores can feed a fast GPU; here
the batch is decoded with nvJPEG (`torchvision.io.decode_jpeg(..., device='cuda')`) and cropped, resized
(bicubic, antialiased) and flipped. The crops and flips are drawn exactly as the CPU pipeline draws them (same
seeds, same order), so only the resampling kernel differs. On the CPU the same code runs with CPU decoding,
which is what the tests exercise."""
import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from util.data import READ_ERRORS
from util.errors import LocalError


def _decode(encoded, device):
    """RGB uint8 [3, H, W] per image: the batch through the device's JPEG decoder; an image it refuses
    (CMYK, PNG, BMP, TIFF, damage only found when decoding) falls back to PIL on the CPU.
    Returns the images and the paths of those no decoder could read."""
    try:
        return decode_jpeg(encoded.data, mode=ImageReadMode.RGB, device=device), []
    except RuntimeError:
        pass
    images, bad = [], []
    for data, path in zip(encoded.data, encoded.paths):
        try:  # PIL, as the CPU pipeline reads it: every format an image folder may hold (BMP, TIFF, ...)
            with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
                rgb = np.asarray(image.convert('RGB'))
            images.append(torch.from_numpy(rgb.copy()).permute(2, 0, 1).to(device))
        except READ_ERRORS:
            images.append(None)
            bad.append(path)
    return images, bad


def decode_on_device(encoded, device, size):
    """uint8 [B, 3, size, size] on `device`: decoded, cropped, resized and flipped there. An image that no
    decoder reads is replaced by another one of the batch; its path is returned for the bad-image count."""
    images, bad = _decode(encoded, device)
    readable = [im for im in images if im is not None]
    if not readable:
        raise LocalError(f'no image of a batch could be decoded, e.g. {encoded.paths[0]}; check the dataset')
    out = []
    for k, (image, (top, left, h, w, flip)) in enumerate(zip(images, encoded.crops.tolist())):
        if image is None:
            image, (top, left, h, w, flip) = readable[0], (0, 0, readable[0].shape[1], readable[0].shape[2], 0)
        crop = image[None, :, top:top + h, left:left + w].float()
        crop = F.interpolate(crop, size=(size, size), mode='bicubic', antialias=True, align_corners=False)
        out.append(crop.flip(-1) if flip else crop)
    return torch.cat(out).round_().clamp_(0, 255).to(torch.uint8), bad
