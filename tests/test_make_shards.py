"""tools/make_shards.py: an image folder as WebDataset shards with the original bytes, ImageFolder's labels and
order, classes.json; the command line."""
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

import util.shards
from conftest import ROOT, cli_env
from tools import make_shards as tool
from tools.make_shards import make_shards
from util.data import ImageFiles
from util.errors import UserError
from util.shards import ShardIndex, find_shards


def file_bytes(path):
    with open(path, 'rb') as f:
        return f.read()


@pytest.fixture
def mixed_folder(tiny_data, tmp_path):
    """tiny_data's training images plus a PNG, a file whose name has dots and a space, one in a subfolder and
    a file that is no image."""
    src = tmp_path / 'train'
    shutil.copytree(os.path.join(tiny_data, 'train'), src)
    Image.fromarray(np.full((9, 11, 3), 200, dtype=np.uint8)).save(src / 'disc' / 'drawn.png')
    shutil.copyfile(src / 'square' / 'square_0000.JPEG', src / 'square' / 'a.b c.jpeg')
    os.makedirs(src / 'square' / 'more')
    shutil.copyfile(src / 'square' / 'square_0001.JPEG', src / 'square' / 'more' / 'again.JPEG')
    (src / 'disc' / 'notes.txt').write_text('not an image')
    return str(src)


def test_the_folder_is_read_as_imagefolder_reads_it(mixed_folder):
    assert tool.image_folder(mixed_folder) == (ImageFolder(mixed_folder).classes, ImageFolder(mixed_folder).samples)
    assert set(tool.IMAGE_EXTENSIONS) == set(IMG_EXTENSIONS) == {f'.{ext}' for ext in util.shards.IMAGE_EXTENSIONS}


def test_shards_hold_the_original_bytes_labels_and_extensions_in_folder_order(mixed_folder, tmp_path, capsys):
    out = str(tmp_path / 'out')
    written = make_shards(mixed_folder, out, shard_size=10)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and lines[0].startswith(f'wrote {written[0]}: 10 images')
    assert '35 images of 4 classes' in lines[-1] and '4 shards' in lines[-1]
    folder = ImageFolder(mixed_folder)
    assert len(folder) == 35 and written == [os.path.join(out, f'train-{k:06d}.tar') for k in range(4)]
    assert find_shards(out, 'train') == written
    with open(os.path.join(out, 'classes.json')) as f:
        assert json.load(f) == folder.classes
    index = ShardIndex(written)
    assert index.labels == folder.targets and index.classes == folder.classes
    assert [index.read(i) for i in range(len(index))] == [file_bytes(path) for path, _ in folder.samples]
    extensions = [name.rsplit('.', 1)[1] for name in index.names]
    assert extensions == ['png' if path.endswith('.png') else 'jpg' for path, _ in folder.samples]
    keys = [os.path.basename(name).rsplit('.', 1)[0] for name in index.names]
    assert keys == sorted(keys) and len(set(keys)) == 35 and not any('.' in key or ' ' in key for key in keys)
    with tarfile.open(written[0]) as tar:
        assert [m.name.rsplit('.', 1)[1] for m in tar.getmembers()[:2]] == ['jpg', 'cls']


def test_shard_size_splits_the_folder(tiny_data, tmp_path):
    """32 images by 10: three full shards and the rest."""
    written = make_shards(os.path.join(tiny_data, 'train'), str(tmp_path), shard_size=10, prefix='tiny')
    assert [os.path.basename(path) for path in written] == [f'tiny-{k:06d}.tar' for k in range(4)]
    counts = []
    for path in written:
        with tarfile.open(path) as tar:
            counts.append(sum(name.endswith('.cls') for name in tar.getnames()))
    assert counts == [10, 10, 10, 2]


def test_shuffle_seed_writes_a_seeded_permutation(tiny_data, tmp_path):
    src = os.path.join(tiny_data, 'train')
    folder = ImageFolder(src)
    by_bytes = {file_bytes(path): label for path, label in folder.samples}

    def order(name, seed):
        index = ShardIndex(make_shards(src, str(tmp_path / name), shard_size=32, shuffle_seed=seed))
        data = [index.read(i) for i in range(len(index))]
        assert [by_bytes[d] for d in data] == index.labels  # each image keeps its label
        return data

    a, b, c = order('a', 1), order('b', 1), order('c', 2)
    assert a == b != c and sorted(a) == sorted(by_bytes) and a != [file_bytes(p) for p, _ in folder.samples]


def test_errors_are_one_line(tiny_data, tmp_path):
    src = os.path.join(tiny_data, 'train')
    make_shards(src, str(tmp_path / 'out'), shard_size=100)
    cases = [
        (lambda: make_shards(src, str(tmp_path / 'out')), 'already holds 1 train-*.tar'),
        (lambda: make_shards(os.path.join(tiny_data, 'val'), str(tmp_path / 'out'), prefix='x'), None),
        (lambda: make_shards(src, str(tmp_path / 'o2'), shard_size=0), '--shard_size'),
        (lambda: make_shards(str(tmp_path / 'missing'), str(tmp_path / 'o3')), 'no folder'),
        (lambda: make_shards(str(tmp_path / 'o2'), str(tmp_path / 'o4')), 'no images'),
        (lambda: make_shards(str(tmp_path / 'o2' / 'empty_class'), str(tmp_path / 'o4')), 'no class folders'),
    ]
    os.makedirs(tmp_path / 'o2' / 'empty_class')
    for call, words in cases:
        if words is None:  # val has the same classes: its shards may share the folder and classes.json
            call()
            continue
        with pytest.raises(UserError) as e:
            call()
        assert '\n' not in str(e.value) and words in str(e.value), str(e.value)
    (tmp_path / 'out' / 'classes.json').write_text('["other"]')
    with pytest.raises(UserError, match='other classes'):
        make_shards(src, str(tmp_path / 'out'), prefix='y')


def test_command_line(tiny_data, tmp_path):
    """`python tools/make_shards.py` writes the shards; `python -m tools.make_shards` on no image folder is one
    line and exit code 2."""
    out = tmp_path / 'out'
    ok = subprocess.run([sys.executable, 'tools/make_shards.py', os.path.join(tiny_data, 'val'), str(out),
                         '--shard_size', '10'], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert len(ok.stdout.splitlines()) == 3 and sorted(os.listdir(out)) == ['classes.json', 'val-000000.tar',
                                                                            'val-000001.tar']
    bad = subprocess.run([sys.executable, '-m', 'tools.make_shards', str(tmp_path / 'nothing'), str(out)], cwd=ROOT,
                         env=cli_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count('\n') == 1 and bad.stderr.startswith('error: no folder'), \
        bad.stderr


def test_a_link_loop_is_written_once_and_said(tiny_data, tmp_path):
    """`train/disc/self -> .`, which os.walk would follow dozens of times over: each image is written once, the
    classes and samples are those training from the folder reads (util.data.ImageFiles), and the tool says which
    link it did not follow; run from another folder, as `python tools/make_shards.py`."""
    src = tmp_path / 'train'
    shutil.copytree(os.path.join(tiny_data, 'train'), src)
    os.symlink('.', src / 'disc' / 'self')
    os.symlink('.', src / 'self')  # a loop as a class folder: no class
    folder = ImageFiles(str(src))
    assert tool.image_folder(str(src)) == (folder.classes, folder.samples) and len(folder) == 32
    out = tmp_path / 'out'
    run = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'make_shards.py'), str(src), str(out),
                          '--shard_size', '10'], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[:2] == [f'warning: not following the link loop {src / "self"} -> .: it leads back to {src}, which '
                         f'holds it',
                         f'warning: not following the link loop {src / "disc" / "self"} -> .: it leads back to '
                         f'{src / "disc"}, which holds it']
    assert len(lines) == 2 + 4 + 1 and '32 images of 4 classes' in lines[-1]
    index = ShardIndex(find_shards(str(out), 'train'))
    assert [index.read(i) for i in range(len(index))] == [file_bytes(path) for path, _ in folder.samples]
    assert index.labels == folder.targets and index.classes == folder.classes


def test_the_tool_imports_no_torch():
    """It runs on storage nodes without torch, and starts at once."""
    check = subprocess.run([sys.executable, '-c', "import sys; import tools.make_shards; "
                            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules"],
                           cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
