"""util/atomic.py: a file is replaced whole or not at all."""
import os

import pytest

from util.atomic import atomic_file, remove_stale_temporaries


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


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    """What a SIGKILL mid-write leaves: removed at the next start when its process is gone; a live process's
    file, another machine's and other files stay."""
    import socket
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True,
                          text=True).stdout.strip()
    host = socket.gethostname()
    names = [f'checkpoint-last.pth.tmp.{host}.{dead}', f'checkpoint-last.pth.tmp.{dead}',  # this session's, older
             f'checkpoint-last.pth.tmp.{host}.{os.getpid()}', f'checkpoint-last.pth.tmp.other-node.{dead}',
             'checkpoint-last.pth', 'notes.tmp']
    for name in names:
        (tmp_path / name).write_bytes(b'x')
    assert sorted(remove_stale_temporaries(str(tmp_path))) == sorted(names[:2])
    assert sorted(os.listdir(tmp_path)) == sorted(names[2:])
