"""util/shards.py: shard lists (brace patterns, folder layouts), the cached header index, reads, damaged shards."""
import io
import multiprocessing
import os
import pickle
import shutil
import tarfile

import pytest
from torchvision.datasets import ImageFolder

import util.shards as shards
from tools.make_shards import make_shards
from util.errors import UserError
from util.shards import ShardIndex, expand, find_shards, index_paths, scan_shard


@pytest.fixture(scope='module')
def made(tiny_data, tmp_path_factory):
    """tiny_data's 32 training images as 4 shards of at most 10, and the folder they were made from."""
    out = tmp_path_factory.mktemp('shards')
    make_shards(os.path.join(tiny_data, 'train'), str(out), shard_size=10)
    return str(out), ImageFolder(os.path.join(tiny_data, 'train'))


@pytest.fixture
def shard_copy(made, tmp_path):
    """A private copy of the shards (tests change them), without their cached indices."""
    out = tmp_path / 'copy'
    shutil.copytree(made[0], out, ignore=shutil.ignore_patterns('*.idx.json'))
    return str(out)


def write_tar(path, members):
    """A shard of {member name: bytes}, in the given order."""
    with tarfile.open(path, 'w') as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def single_line_error(excinfo, *words):
    message = str(excinfo.value)
    assert '\n' not in message and all(word in message for word in words), message


# Shard lists -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('pattern,expected', [
    ('data/train.tar', ['data/train.tar']),
    ('s-{0000..0002}.tar', ['s-0000.tar', 's-0001.tar', 's-0002.tar']),
    ('s-{8..10}.tar', ['s-8.tar', 's-9.tar', 's-10.tar']),
    ('s-{08..10}.tar', ['s-08.tar', 's-09.tar', 's-10.tar']),
    ('s-{2..0}', ['s-2', 's-1', 's-0']),
    ('{a,b}/x-{0..1}.tar', ['a/x-0.tar', 'a/x-1.tar', 'b/x-0.tar', 'b/x-1.tar']),
    ('{train,val{0..1}}.tar', ['train.tar', 'val0.tar', 'val1.tar']),
    ('odd{x}-{0..1}', ['odd{x}-0', 'odd{x}-1']),
])
def test_expand(pattern, expected):
    assert expand(pattern) == expected


def touch(folder, *names):
    os.makedirs(folder, exist_ok=True)
    for name in names:
        open(os.path.join(folder, name), 'wb').close()
    return [os.path.join(folder, name) for name in names]


def test_find_shards_in_split_folders_in_natural_order(tmp_path, tiny_data):
    train = touch(tmp_path / 'train', 'x-2.tar', 'x-10.tar', 'x-1.tar')
    os.makedirs(tmp_path / 'val' / 'ants')  # an image folder: no shards there
    assert find_shards(str(tmp_path), 'train') == [train[2], train[0], train[1]]
    assert find_shards(str(tmp_path), 'val') is None
    validation = touch(tmp_path / 'other' / 'validation', 'v-0.tar')
    assert find_shards(str(tmp_path / 'other'), 'val') == validation
    assert find_shards(tiny_data, 'train') is None  # an image folder
    assert find_shards(str(tmp_path / 'nothing'), 'train') is None


def test_find_shards_by_split_names_in_one_folder(tmp_path):
    """timm's imagenet-1k-wds names: the split is a word of the file name, 'val' also finds 'validation'."""
    train = touch(tmp_path, 'imagenet1k-train-0001.tar', 'imagenet1k-train-0000.tar')
    val = touch(tmp_path, 'imagenet1k-validation-00.tar')
    touch(tmp_path, 'imagenet1k-train-0000.tar.idx.json', 'notes.txt')
    assert find_shards(str(tmp_path), 'train') == sorted(train)
    assert find_shards(str(tmp_path), 'val') == val
    with pytest.raises(UserError) as e:
        find_shards(str(tmp_path), 'test')
    single_line_error(e, str(tmp_path), "'test'")


def test_find_shards_without_split_names_are_training_shards(tmp_path):
    shards_ = touch(tmp_path, 'shard-000001.tar', 'shard-000000.tar')
    assert find_shards(str(tmp_path), 'train') == sorted(shards_)
    with pytest.raises(UserError) as e:  # not silently the training shards
        find_shards(str(tmp_path), 'val')
    single_line_error(e, 'val')


def test_find_shards_of_a_pattern_or_a_file(tmp_path):
    """A pattern is the training shards; evaluation reads a pattern only when it names the split, or the same
    pattern with 'train' replaced by the split's name, so that val is never silently the training images."""
    paths = touch(tmp_path, 'a-00.tar', 'a-01.tar', 'a-02.tar')
    assert find_shards(str(tmp_path / 'a-{00..02}.tar'), 'train') == paths
    with pytest.raises(UserError) as e:
        find_shards(str(tmp_path / 'a-{00..02}.tar'), 'val')
    single_line_error(e, 'names training shards, and no val shards were found beside them')
    train = touch(tmp_path, 'in1k-train-0.tar', 'in1k-train-1.tar')
    val = touch(tmp_path, 'in1k-validation-0.tar', 'in1k-validation-1.tar')
    assert find_shards(str(tmp_path / 'in1k-train-{0..1}.tar'), 'val') == val
    assert find_shards(str(tmp_path / 'in1k-validation-{0..1}.tar'), 'val') == val
    assert find_shards(train[0], 'train') == [train[0]] and find_shards(train[0], 'val') == [val[0]]
    assert find_shards(paths[1], 'train') == [paths[1]]
    assert find_shards(str(tmp_path / 'notes.txt'), 'train') is None
    with pytest.raises(UserError) as e:
        find_shards(str(tmp_path / 'a-{00..05}.tar'), 'train')
    single_line_error(e, str(tmp_path / 'a-03.tar'))



def test_a_stray_tar_in_an_image_folder_leaves_it_an_image_folder(tmp_path):
    """ImageNet's val/ often keeps ILSVRC2012_img_val.tar beside the extracted class folders."""
    (tmp_path / 'val' / 'n01440764').mkdir(parents=True)
    touch(tmp_path / 'val', 'ILSVRC2012_img_val.tar')
    assert find_shards(str(tmp_path), 'val') is None
    touch(tmp_path, 'photo.jpg', 'stray-train.tar')
    assert find_shards(str(tmp_path), 'train') is None


@pytest.mark.parametrize('folder,link,target', [('', 'self', '.'), ('train', 'self', '.'), ('train', 'up', '..')])
def test_a_link_loop_leaves_a_folder_of_shards_one(tmp_path, capsys, folder, link, target):
    """find_shards reads folders one level deep: a loop there is not followed, but it is a sub-folder, which
    made the folder an image folder; it is said once and ignored."""
    found = touch(tmp_path / folder, 'train-0.tar', 'train-1.tar')
    os.symlink(target, tmp_path / folder / link)
    for _ in range(2):
        assert find_shards(str(tmp_path), 'train') == found
    lines = [line for line in capsys.readouterr().out.splitlines() if f'{tmp_path / folder / link} -> {target}' in line]
    assert len(lines) == 1 and 'not following the link loop' in lines[0]
    os.makedirs(tmp_path / 'images' / 'ants')
    os.symlink(str(tmp_path / 'images' / 'ants'), tmp_path / folder / 'ants')  # a link to a folder is a sub-folder
    assert find_shards(str(tmp_path), 'train') is None


def test_a_shard_reached_by_two_names_is_refused(made, tmp_path):
    """A link to a shard beside it would count its samples twice."""
    shutil.copyfile(os.path.join(made[0], 'train-000000.tar'), tmp_path / 'train-0.tar')
    os.symlink('train-0.tar', tmp_path / 'train-1.tar')
    with pytest.raises(UserError) as e:
        ShardIndex(find_shards(str(tmp_path), 'train'))
    assert str(e.value) == (f'shard {tmp_path / "train-1.tar"} is listed twice ({tmp_path / "train-1.tar"} -> '
                            f'train-0.tar is {tmp_path / "train-0.tar"}); list each shard once')
    with pytest.raises(UserError, match=r'^shard \S+train-0.tar is listed twice; list each shard once$'):
        ShardIndex([str(tmp_path / 'train-0.tar'), str(tmp_path / '.' / 'train-0.tar')])


# The index -------------------------------------------------------------------------------------------------

def test_index_gives_the_folders_bytes_labels_and_order(made):
    out, folder = made
    index = ShardIndex(find_shards(out, 'train'))
    assert len(index) == len(folder) == 32 and len(index.shards) == 4
    for i, (path, label) in enumerate(folder.samples):
        with open(path, 'rb') as f:
            assert index.read(i) == f.read()
    assert index.labels == folder.targets
    assert index.classes == folder.classes
    assert len(set(index.names)) == 32
    assert index.names[0].startswith(os.path.join(out, 'train-000000.tar') + '/')
    assert index.names[31].startswith(os.path.join(out, 'train-000003.tar') + '/')


def counting_scans(monkeypatch):
    calls = []
    scan = shards.scan_shard
    monkeypatch.setattr(shards, 'scan_shard', lambda shard: calls.append(shard) or scan(shard))
    return calls


def test_index_is_cached_beside_the_shards_and_rebuilt_when_one_changes(shard_copy, monkeypatch):
    paths = find_shards(shard_copy, 'train')
    first = ShardIndex(paths)
    assert all(os.path.isfile(f'{path}.idx.json') for path in paths)
    with monkeypatch.context() as patch:
        patch.setattr(tarfile, 'open', None)  # a reused index reads no tar header
        again = ShardIndex(paths)
    assert (again.names, again.labels) == (first.names, first.labels)
    assert again.read(5) == first.read(5)

    calls = counting_scans(monkeypatch)
    shutil.copyfile(paths[1], paths[0])  # new content and mtime: shard 0 now holds shard 1's samples
    changed = ShardIndex(paths)
    assert calls == [paths[0]]
    assert changed.labels[:10] == first.labels[10:20]
    assert [changed.read(i) for i in range(10)] == [first.read(i) for i in range(10, 20)]
    os.utime(paths[2], ns=(0, 0))  # same bytes, another mtime
    ShardIndex(paths)
    assert calls == [paths[0], paths[2]]


def test_index_of_a_read_only_folder_is_cached_under_the_cache_folder(shard_copy, monkeypatch):
    os.chmod(shard_copy, 0o555)
    try:
        if os.access(shard_copy, os.W_OK):
            pytest.skip('running as root: a read-only folder is still writable')
        index = ShardIndex(find_shards(shard_copy, 'train'))
        path = find_shards(shard_copy, 'train')[0]
        assert not os.path.exists(f'{path}.idx.json') and os.path.isfile(index_paths(path)[1])
        calls = counting_scans(monkeypatch)
        assert ShardIndex(find_shards(shard_copy, 'train')).names == index.names and not calls
    finally:
        os.chmod(shard_copy, 0o755)


def test_index_falls_back_to_the_cache_folder_when_writing_beside_fails(shard_copy, monkeypatch):
    """The same as the read-only folder, also as root (whom chmod does not stop; NFS root squash does)."""
    write = shards.atomic_file

    def refuse_beside_shards(path, mode='wb'):
        if os.path.dirname(path) == shard_copy:
            raise PermissionError(13, 'Permission denied')
        return write(path, mode)

    monkeypatch.setattr(shards, 'atomic_file', refuse_beside_shards)
    paths = find_shards(shard_copy, 'train')
    index = ShardIndex(paths)
    assert not any(os.path.exists(f'{path}.idx.json') for path in paths)
    assert all(os.path.isfile(index_paths(path)[1]) for path in paths)
    assert index_paths(paths[0])[1].startswith(os.environ['XDG_CACHE_HOME'])
    calls = counting_scans(monkeypatch)
    assert ShardIndex(paths).names == index.names and not calls


def read_in_child(index, queue):
    queue.put(([index.read(i) for i in range(len(index))], set(index._files.values())))


def test_reads_in_a_forked_worker_and_after_pickling(made):
    index = ShardIndex(find_shards(made[0], 'train'))
    expected = [index.read(i) for i in range(len(index))]  # the parent holds open files when the child forks
    ctx = multiprocessing.get_context('fork')
    queue = ctx.Queue()
    child = ctx.Process(target=read_in_child, args=(index, queue))
    child.start()
    got, child_files = queue.get(timeout=30)
    child.join(timeout=30)
    assert child.exitcode == 0 and got == expected
    assert len(child_files) == 4 and not child_files & set(index._files.values())  # the child opened its own
    assert index.read(3) == expected[3]
    copy = pickle.loads(pickle.dumps(index))
    assert not copy._files and copy.read(7) == expected[7]


def test_open_shard_files_are_capped(made, monkeypatch):
    monkeypatch.setattr(shards, 'MAX_OPEN_SHARDS', 2)
    index = ShardIndex(find_shards(made[0], 'train'))
    order = [0, 10, 20, 30, 1, 31, 11, 21, 0]
    expected = []
    for i in order:
        with open(made[1].samples[i][0], 'rb') as f:
            expected.append(f.read())
    assert [index.read(i) for i in order] == expected and len(index._files) == 2


def test_samples_without_cls_have_label_minus_one_and_other_members_are_ignored(tmp_path):
    path = write_tar(tmp_path / 'a.tar', {'k1.json': b'{}', 'k1.JPEG': b'one', 'k1.cls': b'1\n', 'k2.png': b'two',
                                          'dir/k3.webp': b'three', 'k4.txt': b'no image', 'k5.seg.png': b'mask'})
    index = ShardIndex([path])
    assert index.names == [f'{path}/k1.JPEG', f'{path}/k2.png', f'{path}/dir/k3.webp']
    assert index.labels == [1, -1, -1] and index.classes == ['0', '1']
    assert [index.read(i) for i in range(3)] == [b'one', b'two', b'three']


def test_classes_json_beside_the_shards_names_the_classes(tmp_path):
    path = write_tar(tmp_path / 'a.tar', {'k.jpg': b'x', 'k.cls': b'2'})
    (tmp_path / 'classes.json').write_text('["a", "b"]')
    with pytest.raises(UserError) as e:
        ShardIndex([path])
    single_line_error(e, 'classes.json', 'k.jpg')
    (tmp_path / 'classes.json').write_text('["a", "b", "c"]')
    assert ShardIndex([path]).classes == ['a', 'b', 'c']


def test_a_truncated_shard_is_one_line_naming_it(made, tmp_path):
    source = find_shards(made[0], 'train')[0]
    with tarfile.open(source) as tar:
        members = tar.getmembers()
    member = members[4]
    end_of_member = members[5].offset  # the next header starts where this member's padded data ends
    for cut in (member.offset_data + member.size // 2, member.offset_data - 100, end_of_member):
        path = str(tmp_path / f'cut-{cut}.tar')
        with open(source, 'rb') as f, open(path, 'wb') as g:
            g.write(f.read(cut))
        with pytest.raises(UserError) as e:
            ShardIndex([path])
        single_line_error(e, path, 'truncated', 're-copy')


def test_damaged_and_foreign_files_are_one_line_naming_them(tmp_path):
    cases = {
        'text.tar': (b'not a tar file\n' * 100, 'not an uncompressed tar'),
        'empty.tar': (b'', 'not an uncompressed tar'),
        'labels.tar': (open(write_tar(tmp_path / 'x', {'k.cls': b'1', 'k.txt': b'x'}), 'rb').read(), 'no image'),
        'twice.tar': (open(write_tar(tmp_path / 'y', {'k.jpg': b'1', 'k.png': b'2'}), 'rb').read(), 'two images'),
        'badcls.tar': (open(write_tar(tmp_path / 'z', {'k.jpg': b'1', 'k.cls': b'dog'}), 'rb').read(), "'dog'"),
    }
    good = open(write_tar(tmp_path / 'g', {'k.jpg': b'1' * 3000, 'm.jpg': b'2'}), 'rb').read()
    cases['damaged.tar'] = (good[:512 * 7] + b'garbage!' * 64 + good[512 * 8:], 'damaged')
    for name, (data, words) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(UserError) as e:
            scan_shard(str(path))
        single_line_error(e, str(path), words)
    with pytest.raises(UserError) as e:
        ShardIndex([str(tmp_path / 'g'), str(tmp_path / 'g')])
    single_line_error(e, 'twice')


def test_a_corrupt_image_member_is_the_decoders_business(tmp_path):
    path = write_tar(tmp_path / 'a.tar', {'k.jpg': b'\xff\xd8 not really a JPEG'})
    assert ShardIndex([path]).read(0) == b'\xff\xd8 not really a JPEG'
