"""util/atomic.py: a file is replaced whole or not at all."""
import os

import pytest

from util.atomic import atomic_file


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / 'index.json'
    path.write_text('old')
    with pytest.raises(RuntimeError):
        with atomic_file(str(path), 'w') as f:
            f.write('half of the new')
            raise RuntimeError('killed mid-write')
    assert path.read_text() == 'old' and os.listdir(tmp_path) == ['index.json']
    with atomic_file(str(path), 'w') as f:
        f.write('new')
        assert path.read_text() == 'old'  # nothing visible before the rename
    assert path.read_text() == 'new' and os.listdir(tmp_path) == ['index.json']
