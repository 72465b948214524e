"""util/data.py: image folders, tar shards and flat folders, the seeded sampler and loader, unreadable images, eval
shards, transforms."""
import os
import random
import shutil
import signal
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

import util.data as data
from util.data import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, BadImages, EncodedImages, ShardSampler,
                       TrainSampler, TrainSet, eval_loader, eval_transform, image_folder, init_worker,
                       linprobe_transform, pretrain_transform, renormalize, to_device_normalized, train_loader)
from tools.make_shards import make_shards
from util.errors import LocalError, UserError

CLASSES = ('ants', 'bees')


def write_jpegs(folder, count, seed=0, size=(40, 48)):
    """`count` real JPEG files of random noise (each one different) in `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f'img_{i:02d}.JPEG'
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


@pytest.fixture(scope='module')
def jpeg_data(tmp_path_factory):
    """train/{ants,bees}/ with 6 JPEGs each (12 training images) and val/ with 3 each."""
    root = tmp_path_factory.mktemp('jpegs')
    for k, name in enumerate(CLASSES):
        write_jpegs(root / 'train' / name, 6, seed=k)
        write_jpegs(root / 'val' / name, 3, seed=10 + k)
    return str(root)


def simulate_ranks(monkeypatch, rank, world):
    """What util.data reads from util.distributed, as on process `rank` of `world` (no process group)."""
    monkeypatch.setattr(data, 'rank', lambda: rank)
    monkeypatch.setattr(data, 'world_size', lambda: world)


def epoch_batches(loader, epoch, start_batch=0):
    loader.sampler.set_epoch(epoch, start_batch)
    return list(loader)


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for (images, labels, bad), (images_, labels_, bad_) in zip(got, expected):
        assert torch.equal(images, images_) and torch.equal(labels, labels_) and bad == bad_


class ThreadsAndSignals(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.tensor([torch.get_num_threads(), signal.getsignal(signal.SIGTERM) == signal.SIG_IGN,
                             signal.getsignal(signal.SIGINT) == signal.SIG_IGN])


def test_loader_workers_run_one_thread_and_ignore_stop_signals(tiny_data):
    torch.set_num_threads(2)
    try:
        batch = next(iter(DataLoader(ThreadsAndSignals(), batch_size=2, num_workers=1, worker_init_fn=init_worker)))
    finally:
        torch.set_num_threads(1)
    assert batch.tolist() == [[1, 1, 1], [1, 1, 1]]
    from util.data import image_folder, pretrain_transform
    folder = image_folder(tiny_data, 'train', pretrain_transform(32))
    assert train_loader(folder, 8, 1, False, 0).worker_init_fn is init_worker
    assert eval_loader(folder, 8, 1, False).worker_init_fn is init_worker


# The training sampler ------------------------------------------------------------------------------------

def test_train_sampler_order_is_a_function_of_seed_and_epoch():
    """Each epoch is a permutation of the whole dataset, keyed (index, epoch); the same seed and epoch give the
    same order (a restarted run replays it), another epoch or seed another one."""
    def order(seed, epoch):
        sampler = TrainSampler(12, 3, seed)
        sampler.set_epoch(epoch)
        keys = list(sampler)
        assert {e for _, e in keys} == {epoch} and len(sampler) == 12 and sampler.batches_per_epoch == 4
        return [i for i, _ in keys]

    assert sorted(order(0, 0)) == list(range(12))
    assert order(0, 0) == order(0, 0) and order(5, 3) == order(5, 3)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert order(0, 0) != list(range(12))  # shuffled


def test_train_sampler_resumes_after_start_batch_with_exactly_the_rest():
    full = TrainSampler(12, 3, seed=7)
    full.set_epoch(4)
    keys = list(full)
    for start_batch in range(5):
        resumed = TrainSampler(12, 3, seed=7)
        resumed.set_epoch(4, start_batch)
        assert list(resumed) == keys[3 * start_batch:]
        assert len(resumed) == 12 - 3 * start_batch
        assert resumed.batches_per_epoch == 4  # the epoch's length, not what is left of it
    full.set_epoch(5)  # a new epoch starts at its beginning again
    assert len(list(full)) == 12


@pytest.mark.parametrize('length,world', [(12, 2), (12, 3), (13, 2), (10, 4)])
def test_train_sampler_shards_the_epoch_over_processes(monkeypatch, length, world):
    """The ranks' shards are equally long, disjoint up to DistributedSampler's padding of a remainder, and
    together hold every image; a rank's resumed shard is the rest of its own shard."""
    shards = []
    for r in range(world):
        simulate_ranks(monkeypatch, r, world)
        sampler = TrainSampler(length, 2, seed=0)
        sampler.set_epoch(1)
        shards.append([i for i, _ in sampler])
        sampler.set_epoch(1, 1)
        assert [i for i, _ in sampler] == shards[-1][2:]
    per_rank = -(-length // world)
    assert all(len(s) == per_rank for s in shards)
    everything = [i for s in shards for i in s]
    assert set(everything) == set(range(length))
    assert len(everything) - len(set(everything)) == per_rank * world - length  # only the padding repeats


def test_train_loader_refuses_a_dataset_smaller_than_one_batch_per_process(jpeg_data, monkeypatch):
    folder = image_folder(jpeg_data, 'train', pretrain_transform(16))
    assert train_loader(folder, 12, 0, False, 0).sampler.batches_per_epoch == 1
    simulate_ranks(monkeypatch, 0, 2)
    with pytest.raises(UserError, match=r'^the dataset has 12 images, fewer than one batch of 8 per process x 2 '
                                        r'processes; lower --batch_size$'):
        train_loader(folder, 8, 0, False, 0)


# The training loader -------------------------------------------------------------------------------------

def test_train_loader_replays_an_interrupted_epoch_exactly(jpeg_data):
    """Same seed and epoch: the same images, augmented alike, in the same order; resumed after 2 of 4 batches,
    a new loader yields exactly the last 2 batches of the uninterrupted epoch. Another epoch draws other crops."""
    folder = image_folder(jpeg_data, 'train', pretrain_transform(16))
    loader = train_loader(folder, 3, 0, False, seed=3)
    full = epoch_batches(loader, 2)
    assert len(full) == 4
    for images, labels, bad in full:
        assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8 and labels.shape == (3,) and bad == []
    assert sorted(torch.cat([labels for _, labels, _ in full]).tolist()) == [0] * 6 + [1] * 6
    assert_same_batches(epoch_batches(train_loader(folder, 3, 0, False, seed=3), 2), full)
    assert_same_batches(epoch_batches(train_loader(folder, 3, 0, False, seed=3), 2, start_batch=2), full[2:])
    by_index = {i: image for (i, _), image in zip(loader.sampler, torch.cat([b[0] for b in full]))}
    other = epoch_batches(loader, 3)
    for (i, epoch), image in zip(loader.sampler, torch.cat([b[0] for b in other])):
        assert epoch == 3 and not torch.equal(image, by_index[i]), i  # the same image, cropped anew


def test_train_loader_leaves_the_global_rngs_alone(jpeg_data):
    """The masking draws on the global RNGs: loading (shuffle and augmentation) must not move them."""
    folder = image_folder(jpeg_data, 'train', pretrain_transform(16))
    loader = train_loader(folder, 4, 0, False, seed=0)
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    epoch_batches(loader, 0)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]


def test_train_batches_do_not_depend_on_the_worker_count(jpeg_data):
    folder = image_folder(jpeg_data, 'train', pretrain_transform(16))
    in_process = epoch_batches(train_loader(folder, 4, 0, False, seed=1), 1)
    assert_same_batches(epoch_batches(train_loader(folder, 4, 2, False, seed=1), 1), in_process)


def test_encoded_batches_carry_the_crops_and_flips_the_decoding_pipeline_draws(jpeg_data):
    """--gpu_decode's loader (input_size given) hands over the files' bytes and the crop and flip that the CPU
    pipeline would apply: cropping the file by hand with them gives the CPU pipeline's image bit for bit."""
    folder = image_folder(jpeg_data, 'train', pretrain_transform(16))
    decoded = epoch_batches(train_loader(folder, 4, 0, False, seed=2), 0)
    encoded = epoch_batches(train_loader(folder, 4, 0, False, seed=2, input_size=16), 0)
    assert len(encoded) == len(decoded) == 3
    for (images, labels, _), (batch, labels_, bad) in zip(decoded, encoded):
        assert isinstance(batch, EncodedImages) and torch.equal(labels, labels_) and bad == []
        assert batch.crops.shape == (4, 5) and batch.crops.dtype == torch.int64
        for image, raw, (top, left, h, w, flip), path in zip(images, batch.data, batch.crops.tolist(), batch.paths):
            with open(path, 'rb') as f:
                assert raw.dtype == torch.uint8 and raw.numpy().tobytes() == f.read()
            crop = TF.resized_crop(Image.open(path).convert('RGB'), top, left, h, w, [16, 16],
                                   InterpolationMode.BICUBIC, antialias=True)
            assert flip in (0, 1)
            assert torch.equal(TF.pil_to_tensor(TF.hflip(crop) if flip else crop), image)
    crops = [tuple(crop) for batch, _, _ in encoded for crop in batch.crops.tolist()]
    assert len(set(crops)) == len(crops)  # each image its own draw (all files have one size)
    assert {flip for *_, flip in crops} == {0, 1}


# Unreadable images ---------------------------------------------------------------------------------------

def test_an_unreadable_image_is_replaced_by_the_next_and_reported(tmp_path):
    paths = write_jpegs(tmp_path / 'train' / 'ants', 4)
    with open(paths[1], 'wb') as f:
        f.write(b'not a jpeg at all')
    folder = image_folder(str(tmp_path), 'train', pretrain_transform(16))
    dataset = TrainSet(folder, seed=0)
    image, label, bad = dataset[(1, 0)]
    assert bad == [paths[1]] and label == 0
    assert torch.equal(image, dataset[(2, 0)][0])  # the next image, under its own seed
    assert dataset[(0, 0)][2] == []
    batches = epoch_batches(train_loader(folder, 4, 0, False, seed=0), 0)
    assert [b for _, _, b in batches] == [[paths[1]]]  # the batch names the file it skipped


def test_only_unreadable_images_is_one_line_naming_the_first(tmp_path):
    paths = write_jpegs(tmp_path / 'train' / 'ants', 3)
    for path in paths:
        with open(path, 'wb') as f:
            f.write(b'\xff\xd8\xff truncated')
    dataset = TrainSet(image_folder(str(tmp_path), 'train', pretrain_transform(16)), seed=0)
    with pytest.raises(LocalError) as error:
        dataset[(1, 0)]
    message = str(error.value)
    assert message.startswith(f'3 consecutive unreadable images from {paths[1]}; is ') and '\n' not in message



class BadRun(Dataset):
    """`length` samples of which the first `bad` are unreadable: files that sort together, as a bad copy of one
    folder leaves them."""

    def __init__(self, length, bad):
        self.samples, self.bad, self.root = [(f'img_{i:04d}.jpg', 0) for i in range(length)], bad, 'folder'

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        if i < self.bad:
            raise UserError(f'cannot read image {self.samples[i][0]}')
        return torch.full((1,), float(i)), 0


def test_a_run_of_unreadable_images_is_skipped_while_the_fraction_allows_it():
    """33 unreadable images in a row out of 1,057 (3.1%) are skipped under --max_bad_frac 0.1; past what the
    fraction allows in a row, it is one line."""
    image, _, bad = TrainSet(BadRun(1057, 33), seed=0, max_bad_frac=0.1)[(0, 0)]
    assert image.item() == 33 and len(bad) == 33
    with pytest.raises(LocalError, match='^32 consecutive unreadable images from img_0000.jpg'):
        TrainSet(BadRun(100, 40), seed=0, max_bad_frac=0.1)[(0, 0)]  # at least 32 looked at, more for large sets
    with pytest.raises(LocalError, match='^106 consecutive unreadable images'):
        TrainSet(BadRun(1057, 200), seed=0, max_bad_frac=0.1)[(0, 0)]  # 10% of 1,057, plus one


def test_bad_images_are_logged_once_and_stop_the_run_past_the_threshold(capsys):
    bad = BadImages(dataset_size=10, max_frac=0.2)
    assert bad.check() == 0
    bad.add(['/d/train/b/2.JPEG', '/d/train/a/1.JPEG'])
    bad.add(['/d/train/a/1.JPEG'])  # met again before the check
    assert bad.check() == 2  # 2 of 10: at the threshold, not past it
    bad.add(['/d/train/b/2.JPEG'])  # met again in a later epoch
    assert bad.check() == 2
    out = capsys.readouterr().out
    assert out.count('skipping unreadable image /d/train/a/1.JPEG') == 1
    assert out.count('skipping unreadable image /d/train/b/2.JPEG') == 1
    bad.add(['/d/train/c/3.JPEG'])
    with pytest.raises(UserError) as error:
        bad.check()
    message = str(error.value)
    assert '\n' not in message
    assert message.startswith('3 of 10 training images are unreadable (such as /d/train/a/1.JPEG), more than '
                              '--max_bad_frac 0.2;')
    assert BadImages(dataset_size=10, max_frac=0.0).check() == 0  # a clean dataset passes a zero threshold


# Evaluation shards ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('length', [1, 7, 15, 16])
@pytest.mark.parametrize('world', [1, 2, 3, 4])
def test_shards_cover_every_index_exactly_once(length, world):
    shards = [list(ShardSampler(length, r, world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(length))  # no padding duplicates, none left out
    assert [len(ShardSampler(length, r, world)) for r in range(world)] == [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_eval_loader_shards_over_the_processes_without_dropping_or_padding(monkeypatch):
    dataset = TensorDataset(torch.arange(15))
    seen = []
    for r in range(2):
        simulate_ranks(monkeypatch, r, 2)
        batches = [b.tolist() for (b,) in eval_loader(dataset, 4, 0, False)]
        assert [len(b) for b in batches] == ([4, 4] if r == 0 else [4, 3])  # the last batch is kept
        seen += [i for b in batches for i in b]
    assert sorted(seen) == list(range(15))


# Image folders -------------------------------------------------------------------------------------------

def test_image_folder_reads_the_imagenet_layout(jpeg_data):
    folder = image_folder(jpeg_data, 'val', None)
    assert folder.classes == list(CLASSES) and len(folder) == 6
    image, label = folder[4]
    assert image.mode == 'RGB' and image.size == (40, 48) and label == 1


def test_image_folder_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match=f'^no folder {tmp_path / "train"}: --data_path must hold '
                                        r'train/<class>/<images> \(the ImageNet layout\)$'):
        image_folder(str(tmp_path), 'train', None)
    (tmp_path / 'val').mkdir()  # no class folders
    with pytest.raises(UserError) as error:
        image_folder(str(tmp_path), 'val', None)
    assert str(error.value).startswith(f'no images under {tmp_path / "val"} (')
    assert str(error.value).endswith('); --data_path must hold val/<class>/<images>')
    (tmp_path / 'val' / 'ants').mkdir()  # a class folder without images
    (tmp_path / 'val' / 'ants' / 'notes.txt').write_text('not an image')
    with pytest.raises(UserError, match=f'^no images under {tmp_path / "val"} '):
        image_folder(str(tmp_path), 'val', None)



# Links in image folders: followed, but never round a loop nor twice into one folder ----------------------------

@pytest.fixture
def data_copy(tiny_data, tmp_path):
    """A private copy of tiny_data (train/: 4 classes x 8 images), for tests that add links to it."""
    shutil.copytree(tiny_data, tmp_path / 'data')
    return tmp_path / 'data'


def said(capsys, *words):
    """The printed lines that hold all `words`."""
    return [line for line in capsys.readouterr().out.splitlines() if all(word in line for word in words)]


@pytest.mark.parametrize('link,target', [
    ('disc/self', '.'),  # the folder itself: 40 nested copies of disc/ before
    ('disc/deep/up', '../..'),  # train/, two levels up
    ('disc/top', '../..'),  # the folder train/ is in
    ('self', '.'),  # a class folder that is train/ itself
])
def test_a_link_loop_is_not_followed_and_said_once(data_copy, capsys, link, target):
    train = data_copy / 'train'
    expected = ImageFolder(str(train)).samples
    (train / link).parent.mkdir(exist_ok=True)
    os.symlink(target, train / link)
    for labelled in (True, False):  # classification and pretraining
        dataset = image_folder(str(data_copy), 'train', None, labelled=labelled)
        assert dataset.samples == expected and len(dataset.classes) == 4
    lines = said(capsys, f'{train / link} -> {target}')
    assert len(lines) == 1 and 'not following the link loop' in lines[0], lines  # once, though opened twice


@pytest.mark.parametrize('link,target', [('self', '.'), ('more/up', '..'), ('more/top', '../..')])
def test_a_link_loop_in_a_flat_folder(tmp_path, capsys, link, target):
    images = write_jpegs(tmp_path / 'photos', 3) + write_jpegs(tmp_path / 'photos' / 'more', 2, seed=1)
    os.symlink(target, tmp_path / 'photos' / link)
    dataset = image_folder(str(tmp_path / 'photos'), 'train', None, labelled=False)
    assert isinstance(dataset, data.FlatImages) and [path for path, _ in dataset.samples] == images
    assert len(said(capsys, f'{tmp_path / "photos" / link} -> {target}', 'loop')) == 1


def test_a_folder_reached_by_two_links_is_read_once(data_copy, capsys):
    train, disc = data_copy / 'train', data_copy / 'train' / 'disc'
    extra = write_jpegs(data_copy / 'extra', 2, seed=3)
    os.symlink('../../extra', disc / 'a')
    os.symlink(str(data_copy / 'extra'), disc / 'b')
    dataset = image_folder(str(data_copy), 'train', None)
    linked = [str(disc / 'a' / os.path.basename(path)) for path in extra]
    assert len(dataset) == 34 and [p for p, label in dataset.samples if '/disc/a/' in p or '/disc/b/' in p] == linked
    lines = said(capsys, f'{disc / "b"} -> {data_copy / "extra"}', f'the folder {disc / "a"} again', 'counted once')
    assert len(lines) == 1
    flat = image_folder(str(disc), 'train', None, labelled=False)  # disc/ as a flat folder: the same
    assert isinstance(flat, data.FlatImages) and len(flat) == 10
    with pytest.raises(UserError, match='are the same folder'):  # disc/ as the class root: a/, b/ two classes
        image_folder(str(train), 'disc', None)


def test_a_folder_in_two_classes_is_refused(data_copy):
    """Its images would have two labels: not a layout to guess at."""
    train = data_copy / 'train'
    os.symlink('../square', train / 'disc' / 'squares')
    with pytest.raises(UserError) as error:
        image_folder(str(data_copy), 'train', None)
    assert str(error.value) == (f'{train / "square"} (class square) and {train / "disc" / "squares"} -> ../square '
                                f'(class disc) are the same folder: its images cannot have two labels; remove one '
                                f'of them')


def test_links_to_folders_elsewhere_are_followed_in_imagefolders_order(data_copy):
    """Datasets are often assembled from links: absolute and relative ones, to class folders and below them; the
    samples and their order stay torchvision ImageFolder's (sorted folder paths: `b-c` before `b/x`)."""
    elsewhere = data_copy / 'elsewhere'
    for name, count in (('b', 1), ('b-c', 2), ('b/x', 1), ('b/x/y', 1), ('a', 1)):
        write_jpegs(elsewhere / name, count, seed=count)
    linked = data_copy / 'linked'
    linked.mkdir()
    os.symlink(str(data_copy / 'train' / 'disc'), linked / 'disc')
    os.symlink('../train/square', linked / 'square')
    os.symlink('../../elsewhere/a', data_copy / 'train' / 'square' / 'a')
    (linked / 'mixed').mkdir()
    for name in ('b', 'b-c'):
        os.symlink(str(elsewhere / name), linked / 'mixed' / name)
    folder = image_folder(str(data_copy), 'linked', None)
    assert folder.samples == ImageFolder(str(linked)).samples and len(folder) == 8 + 5 + 9
    assert [os.path.relpath(p, linked / 'mixed') for p, _ in folder.samples if '/mixed/' in p] == [
        'b/img_00.JPEG', 'b-c/img_00.JPEG', 'b-c/img_01.JPEG', 'b/x/img_00.JPEG', 'b/x/y/img_00.JPEG']


def test_link_lines_past_the_first_few_are_counted(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, 'MAX_NOTES', 2)
    write_jpegs(tmp_path / 'photos', 1)
    for k in range(5):
        os.symlink('.', tmp_path / 'photos' / f'self{k}')
    assert len(image_folder(str(tmp_path / 'photos'), 'train', None, labelled=False)) == 1
    out = capsys.readouterr().out
    assert out.count('not following the link loop') == 2 and f'3 more links under {tmp_path / "photos"}' in out


def test_the_layout_found_is_logged(jpeg_data, jpeg_shards, tmp_path, capsys):
    """One line per dataset opened, naming the layout --data_path was taken as and its size."""
    image_folder(jpeg_data, 'train', None)
    image_folder(jpeg_shards, 'val', None)
    write_jpegs(tmp_path / 'photos', 3)
    image_folder(str(tmp_path / 'photos'), 'train', None, labelled=False)
    with tarfile.open(tmp_path / 'unlabelled.tar', 'w') as tar:
        tar.add(write_jpegs(tmp_path / 'src', 1)[0], arcname='sample0.jpg')
    image_folder(str(tmp_path / 'unlabelled.tar'), 'train', None, labelled=False)
    lines = [line.split(' ', 1)[1] for line in capsys.readouterr().out.splitlines() if ' data: ' in line]
    assert lines == [f'train data: image folder {jpeg_data}/train: 12 images in 2 classes',
                     f'val data: 2 tar shards in {jpeg_shards}: 6 images, 2 classes',
                     f'train data: folder of images without classes {tmp_path / "photos"}: 3 images',
                     f'train data: 1 tar shard in {tmp_path / "unlabelled.tar"}: 1 images, unlabelled']


# Tar shards and flat folders -------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def jpeg_shards(jpeg_data, tmp_path_factory):
    """jpeg_data's splits as tar shards of 5 samples (tools/make_shards.py), train and val in one folder."""
    out = str(tmp_path_factory.mktemp('shards'))
    for split in ('train', 'val'):
        make_shards(os.path.join(jpeg_data, split), out, shard_size=5)
    return out


@pytest.mark.parametrize('split', ['train', 'val'])
def test_shards_hold_the_folders_bytes_labels_and_classes(jpeg_data, jpeg_shards, split):
    folder, shards = image_folder(jpeg_data, split, None), image_folder(jpeg_shards, split, None)
    assert isinstance(shards, data.ShardImages) and shards.classes == folder.classes == list(CLASSES)
    assert [label for _, label in shards.samples] == [label for _, label in folder.samples]
    assert all(shards.read(i) == folder.read(i) for i in range(len(folder)))
    assert all(shards.samples[i][0].startswith(jpeg_shards) and '.tar/' in shards.samples[i][0]
               for i in range(len(folder)))


@pytest.mark.parametrize('input_size', [None, 16])
def test_shards_give_the_folders_batches(jpeg_data, jpeg_shards, input_size):
    """The same augmentations for the same seed (per-sample seeds follow the sample index), in the CPU pipeline
    and in --gpu_decode's (bytes, crop and flip)."""
    def batches(root):
        loader = train_loader(image_folder(root, 'train', pretrain_transform(16), labelled=False), 4, 0, False,
                              seed=5, input_size=input_size)
        return epoch_batches(loader, 1)

    for (images, labels, bad), (images_, labels_, bad_) in zip(batches(jpeg_data), batches(jpeg_shards)):
        assert torch.equal(labels, labels_) and bad == bad_ == []
        if input_size is None:
            assert torch.equal(images, images_)
        else:
            assert torch.equal(images.crops, images_.crops)
            assert all(torch.equal(a, b) for a, b in zip(images.data, images_.data))


def test_a_corrupt_shard_member_is_skipped_and_named(tmp_path):
    paths = write_jpegs(tmp_path / 'src' / 'ants', 4)
    with open(paths[1], 'wb') as f:
        f.write(b'not a jpeg at all')
    make_shards(str(tmp_path / 'src'), str(tmp_path / 'shards'), shard_size=10, prefix='train')
    dataset = TrainSet(image_folder(str(tmp_path / 'shards'), 'train', pretrain_transform(16)), seed=0)
    image, _, bad = dataset[(1, 0)]
    assert len(bad) == 1 and bad[0].startswith(str(tmp_path / 'shards' / 'train-000000.tar') + '/')
    assert bad[0].endswith('img_01.jpg') and torch.equal(image, dataset[(2, 0)][0])


def test_a_truncated_shard_is_one_line_naming_it(jpeg_shards, tmp_path):
    shard = tmp_path / 'train-000000.tar'
    content = open(os.path.join(jpeg_shards, 'train-000000.tar'), 'rb').read()
    shard.write_bytes(content[:len(content) // 2])
    with pytest.raises(UserError) as error:
        image_folder(str(shard), 'train', None)
    assert str(shard) in str(error.value) and 'truncated' in str(error.value) and '\n' not in str(error.value)


def test_classification_refuses_shards_without_labels(tmp_path):
    (tmp_path / 'shards').mkdir()
    with tarfile.open(tmp_path / 'shards' / 'train-0.tar', 'w') as tar:
        tar.add(write_jpegs(tmp_path / 'src', 1)[0], arcname='sample0.jpg')
    assert len(image_folder(str(tmp_path / 'shards'), 'train', None, labelled=False)) == 1  # pretraining needs none
    with pytest.raises(UserError, match='without a .cls label .*write them with tools/make_shards.py'):
        image_folder(str(tmp_path / 'shards'), 'train', None)


def test_pretraining_reads_a_flat_folder_of_images(tmp_path):
    """Unlabelled images, no class folders: every image below the folder, recursively, in sorted order."""
    top = write_jpegs(tmp_path / 'photos', 3)
    nested = write_jpegs(tmp_path / 'photos' / 'more', 2, seed=1)
    (tmp_path / 'photos' / 'notes.txt').write_text('not an image')
    dataset = image_folder(str(tmp_path / 'photos'), 'train', pretrain_transform(16), labelled=False)
    assert [path for path, _ in dataset.samples] == top + nested and dataset.classes == ['images']
    image, label = dataset[0]
    assert image.shape == (3, 16, 16) and label == 0 and dataset.read(1) == open(top[1], 'rb').read()
    assert len(image_folder(str(tmp_path), 'train', None, labelled=False)) == 5  # photos/ as the class layout
    with pytest.raises(UserError, match='no folder .*train'):  # classification needs train/<class>/
        image_folder(str(tmp_path / 'photos'), 'train', None)


# Transforms and normalisation ----------------------------------------------------------------------------

def test_pretrain_transform_makes_uint8_crops():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 70, 3), dtype=np.uint8))
    out = pretrain_transform(32)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8


@pytest.mark.parametrize('transform', [eval_transform, linprobe_transform], ids=['eval', 'linprobe'])
def test_classification_transforms_make_normalised_float_images(transform):
    """A flat colour stays flat through any crop and resize: its tensor is (colour / 255 - mean) / std."""
    colour = (200, 100, 30)
    out = transform(32)(Image.new('RGB', (70, 48), colour))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = (torch.tensor(colour) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out, expected[:, None, None].expand(3, 32, 32), rtol=0, atol=1e-5)


def test_eval_transform_is_a_resize_and_centre_crop():
    """Input 32: the short side resized to 32 / 0.875 = 36 (keeping the aspect), then the centre 32 x 32. A 72 x 36
    picture already has that short side: the output is its pixels [2:34, 20:52], normalised."""
    pixels = np.random.default_rng(0).integers(0, 256, (36, 72, 3), dtype=np.uint8)
    out = eval_transform(32)(Image.fromarray(pixels))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    crop = torch.from_numpy(pixels[2:34, 20:52]).permute(2, 0, 1) / 255
    expected = (crop - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_normalisation_on_the_device_and_renormalisation_agree():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = to_device_normalized(images, torch.device('cpu'))
    assert x.dtype == torch.float32 and x.shape == images.shape
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (images.double() / 255 - mean.double()) / std.double(), check_dtype=False,
                               rtol=0, atol=1e-5)
    clip = to_device_normalized(images, torch.device('cpu'), CLIP_MEAN, CLIP_STD)
    torch.testing.assert_close(renormalize(x, IMAGENET_MEAN, IMAGENET_STD, CLIP_MEAN, CLIP_STD), clip,
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(renormalize(clip, CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD), x,
                               rtol=0, atol=1e-5)
    assert not torch.allclose(clip, x, atol=1e-2)  # the two normalisations really differ
    # OpenAI CLIP's preprocessing constants
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073) and CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
