"""--gpu_decode's pipeline, run on the CPU: the same crops and flips as the CPU pipeline, images that match
it up to the resampling kernel, the SPEC's crop statistics, and unreadable files skipped and named."""
import io
import math
import shutil

import pytest
import torch
from PIL import Image

from conftest import pretrain_argv
from util.data import EncodedTrainSet, TrainSet, collate_encoded, image_folder, pretrain_transform
from util.device_decode import decode_on_device

SIZE = 48


@pytest.fixture(scope='module')
def folders(tiny_data):
    return (image_folder(tiny_data, 'train', pretrain_transform(SIZE)),
            image_folder(tiny_data, 'train', None))


def test_same_crops_as_the_cpu_pipeline(folders):
    cpu_folder, raw_folder = folders
    cpu, encoded = TrainSet(cpu_folder, seed=3), EncodedTrainSet(raw_folder, seed=3, input_size=SIZE)
    keys = [(i, epoch) for i in range(0, 32, 3) for epoch in (0, 1)]
    reference = torch.stack([cpu[key][0] for key in keys])
    batch, labels, bad = collate_encoded([encoded[key] for key in keys])
    images, unreadable = decode_on_device(batch, 'cpu', SIZE)
    assert images.dtype == torch.uint8 and images.shape == reference.shape and not bad and not unreadable
    assert labels.tolist() == [cpu_folder.targets[i] for i, _ in keys]
    diff = (images.float() - reference.float()).abs()
    assert diff.mean() < 1  # same crop and flip; only PIL's and torch's bicubic kernels differ (0.18 seen)
    # a wrong flip or crop would be far off: compare against the mirrored images
    assert (images.flip(-1).float() - reference.float()).abs().mean() > 3 * diff.mean()


def test_crop_statistics_follow_the_spec(folders):
    _, raw_folder = folders
    encoded = EncodedTrainSet(raw_folder, seed=0, input_size=SIZE)
    keys = [(i, epoch) for i in range(32) for epoch in range(25)]
    crops = torch.stack([encoded[key][0][1] for key in keys]).double()
    sizes = [Image.open(path).size for path, _ in raw_folder.samples]
    sizes = torch.tensor([sizes[i] for i, _ in keys], dtype=torch.float64)  # (w, h)
    area = crops[:, 2] * crops[:, 3] / (sizes[:, 0] * sizes[:, 1])
    ratio = crops[:, 3] / crops[:, 2]
    assert area.min() >= 0.2 - 0.02 and area.max() <= 1.0 and area.mean() > 0.45  # scale (0.2, 1)
    assert ratio.log().abs().max() <= math.log(4 / 3) + 0.1  # aspect ratios 3/4 .. 4/3 (up to rounding)
    assert 0.35 < crops[:, 4].mean() < 0.65  # half of the images flipped


def test_undecodable_and_cmyk_files(tiny_data, tmp_path, capsys):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    broken = data / 'train' / 'square' / 'square_0002.JPEG'
    broken.write_bytes(broken.read_bytes()[:len(broken.read_bytes()) // 2])  # header fine, body cut
    cmyk = data / 'train' / 'disc' / 'disc_0001.JPEG'
    buffer = io.BytesIO()
    Image.open(cmyk).convert('CMYK').save(buffer, 'JPEG')
    cmyk.write_bytes(buffer.getvalue())
    others = [data / 'train' / 'disc' / f'other.{ext}' for ext in ('bmp', 'tiff', 'png')]  # formats PIL reads
    for path in others:
        Image.open(data / 'train' / 'disc' / 'disc_0002.JPEG').save(path)
    folder = image_folder(str(data), 'train', None)
    encoded = EncodedTrainSet(folder, seed=0, input_size=SIZE)
    index = {path: i for i, (path, _) in enumerate(folder.samples)}
    batch, _, _ = collate_encoded([encoded[(index[str(path)], 0)] for path in [broken, cmyk, *others]])
    images, unreadable = decode_on_device(batch, 'cpu', SIZE)
    assert images.shape == (5, 3, SIZE, SIZE) and unreadable == [str(broken)]

    import main_pretrain
    from util.cli import parse_args
    args = parse_args(main_pretrain.get_args_parser(), {}, pretrain_argv(str(data), tmp_path / 'out', '--gpu_decode'))
    main_pretrain.main(args)
    assert f'skipping unreadable image {broken}' in capsys.readouterr().out
