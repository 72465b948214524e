"""util/folders.py: folders told apart by identity, not path, so link loops are not followed and a folder reached
twice is read once; the walk's order is os.walk's sorted order (torchvision ImageFolder's); the lines about links;
no torch."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, cli_env
from util.errors import UserError
from util.folders import (again_note, class_folders, class_images, folders_above, identity, link_text, loop_note,
                          shown_notes, walk_images)


def is_image(path):
    return path.endswith('.jpg')


def files(folder, *names):
    """Empty files `names` in `folder` (made with its parents): the walk goes by names only."""
    os.makedirs(folder, exist_ok=True)
    for name in names:
        open(os.path.join(folder, name), 'w').close()
    return [os.path.join(folder, name) for name in names]


def walked(top, above=None):
    """(image paths, notes) of walk_images from `top`, as FlatImages walks a folder."""
    notes = []
    return walk_images(str(top), is_image, folders_above(str(top))[1:] if above is None else above, {}, notes), notes


def os_walk_order(top):
    """What torchvision ImageFolder's os.walk (links followed) finds, in its order."""
    return [os.path.join(d, f) for d, _, names in sorted(os.walk(str(top), followlinks=True))
            for f in sorted(names) if is_image(f)]


def test_identity_is_the_folder_not_its_path(tmp_path):
    (tmp_path / 'real').mkdir()
    (tmp_path / 'other').mkdir()
    os.symlink('real', tmp_path / 'link')
    os.symlink(str(tmp_path / 'link'), tmp_path / 'link_to_link')
    real = identity(os.stat(tmp_path / 'real'))
    assert identity(os.stat(tmp_path / 'link')) == identity(os.stat(tmp_path / 'link_to_link')) == real
    assert identity(os.stat(tmp_path / 'other')) != real


def test_folders_above_are_the_real_folders_up_to_the_root(tmp_path):
    (tmp_path / 'a' / 'b').mkdir(parents=True)
    os.symlink(str(tmp_path / 'a' / 'b'), tmp_path / 'b_link')
    chain = folders_above(str(tmp_path / 'b_link'))
    assert chain[0] == (identity(os.stat(tmp_path / 'a' / 'b')), str(tmp_path / 'b_link'))  # the path as given
    real = os.path.realpath(tmp_path / 'a')  # then the folders it is really in, not the link's
    assert chain[1] == (identity(os.stat(real)), real) and chain[-1][1] == '/'
    assert len(chain) == real.count('/') + 2


def test_a_loop_is_known_by_identity_whatever_its_path(tmp_path):
    """Links back to the folder itself, to its parent, by absolute path and through a second link: each found
    once, never followed, so every image counts once."""
    top = tmp_path / 'top'
    images = files(top, 'a.jpg') + files(top / 'sub', 'b.jpg', 'notes.txt')[:1]
    os.symlink('.', top / 'self')
    os.symlink('..', top / 'sub' / 'up')
    os.symlink(str(top), top / 'sub' / 'absolute')
    os.symlink('sub', top / 'via')  # top/via is sub again, reached by another name: read once, there
    paths, notes = walked(top)
    assert paths == images
    assert sorted(notes) == sorted([
        loop_note(str(top / 'self'), str(top)),
        loop_note(str(top / 'sub' / 'absolute'), str(top)),
        loop_note(str(top / 'sub' / 'up'), str(top)),
        again_note(str(top / 'via'), str(top / 'sub')),
    ])


def test_a_loop_through_two_links(tmp_path):
    """x/y -> ../z and z/w -> ../x: no path repeats, only the folders do."""
    top = tmp_path / 'top'
    images = files(top / 'x', 'x.jpg') + files(top / 'z', 'z.jpg')
    os.symlink('../z', top / 'x' / 'y')
    os.symlink('../x', top / 'z' / 'w')
    paths, notes = walked(top)
    assert paths == [images[0], str(top / 'x' / 'y' / 'z.jpg')]  # z's image once, where the walk met z first
    assert notes == [loop_note(str(top / 'x' / 'y' / 'w'), str(top / 'x')),
                     again_note(str(top / 'z'), str(top / 'x' / 'y'))]


def test_a_link_to_a_folder_above_the_top_is_a_loop(tmp_path):
    """`above` holds the folders the walk's top is in: a class folder linking to the class root loops."""
    files(tmp_path / 'root' / 'cls', 'a.jpg')
    os.symlink('../..', tmp_path / 'root' / 'cls' / 'out')
    notes = []
    paths = walk_images(str(tmp_path / 'root' / 'cls'), is_image, folders_above(str(tmp_path / 'root')), {}, notes)
    assert paths == [str(tmp_path / 'root' / 'cls' / 'a.jpg')]
    assert notes == [loop_note(str(tmp_path / 'root' / 'cls' / 'out'), os.path.realpath(tmp_path))]


def test_the_walk_order_is_sorted_os_walk_order(tmp_path):
    """Sorted folder paths (`b-c` before `b/x`, capitals first), each folder's files sorted; links to folders
    elsewhere followed where os.walk follows them, unreadable entries as os.walk has them."""
    top = tmp_path / 'top'
    for folder in ('b', 'b-c', 'b/x', 'b/x/y', 'B', 'a.b', 'a', 'a/-', 'ä'):
        files(top / folder, 'z.jpg', 'Z.jpg', '1.jpg', 'a b.jpg', 'skip.png')
    files(tmp_path / 'elsewhere' / 'e', 'e.jpg')
    os.symlink(str(tmp_path / 'elsewhere'), top / 'b' / 'linked')
    os.symlink('missing', top / 'b' / 'broken.jpg')  # a file to both: it cannot be examined
    paths, notes = walked(top)
    assert paths == os_walk_order(top) and len(paths) == 9 * 4 + 1 + 1 and notes == []
    assert paths.index(str(top / 'b-c' / '1.jpg')) < paths.index(str(top / 'b' / 'x' / '1.jpg'))


def test_the_notes_name_the_link_and_where_it_leads(tmp_path):
    (tmp_path / 'd').mkdir()
    os.symlink('.', tmp_path / 'd' / 'self')
    link = str(tmp_path / 'd' / 'self')
    assert link_text(link) == f'{link} -> .' and link_text(str(tmp_path / 'd')) == str(tmp_path / 'd')
    assert loop_note(link, str(tmp_path / 'd')) == (
        f'warning: not following the link loop {link} -> .: it leads back to {tmp_path / "d"}, which holds it')
    assert again_note(link, '/data/x') == f'note: {link} -> . is the folder /data/x again: its images are counted ' \
                                          f'once, there'
    assert again_note(str(tmp_path / 'd'), '/data/x').startswith(f'note: {tmp_path / "d"} is the folder /data/x')


def test_lines_past_the_limit_are_counted():
    notes = [f'line {k}' for k in range(5)]
    assert shown_notes(notes, '/data', 5) == notes
    assert shown_notes(notes, '/data', 2) == ['line 0', 'line 1', 'note: 3 more links under /data like those above']
    assert shown_notes([], '/data', 2) == []


def test_classes_leave_out_loops_and_refuse_a_folder_in_two(tmp_path):
    root = tmp_path / 'root'
    files(root / 'cat', 'c.jpg')
    files(root / 'dog', 'd.jpg')
    os.symlink('.', root / 'self')
    os.symlink('..', root / 'cat' / 'up')
    notes = []
    classes = class_folders(str(root), notes)
    assert classes == ['cat', 'dog'] and notes == [loop_note(str(root / 'self'), str(root))]
    assert class_images(str(root), classes, is_image, notes) == [[str(root / 'cat' / 'c.jpg')],
                                                                 [str(root / 'dog' / 'd.jpg')]]
    assert notes[1:] == [loop_note(str(root / 'cat' / 'up'), str(root))]
    os.symlink('../cat', root / 'dog' / 'cats')
    with pytest.raises(UserError, match=r'dog/cats -> \.\./cat \(class dog\) and .*/cat \(class cat\) are the same'):
        class_images(str(root), classes, is_image, [])


def test_no_torch_is_imported():
    """tools/make_shards.py walks folders with it on machines without torch."""
    check = subprocess.run([sys.executable, '-c', "import sys; import util.folders; assert 'torch' not in sys.modules"],
                           cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
