"""Files written whole or not at all: what a crash, a kill or a full disk leaves behind is the previous file,
never half of a new one."""
import contextlib
import os
import re
import socket


TEMPORARY = re.compile(r'\.tmp\.(?:(?P<host>[^/]+)\.)?(?P<pid>\d+)$')


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder: str) -> list:
    """Delete the temporary files that processes of this machine killed mid-write left in `folder` (their pid is
    gone), and return their names: a SIGKILL during a checkpoint write leaves one behind each time. Files of
    live processes, and of other machines, are left alone."""
    removed = []
    host = socket.gethostname()
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        match = TEMPORARY.search(name)
        if match and match['host'] in (None, host) and not _alive(int(match['pid'])):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
                removed.append(name)
    return removed


@contextlib.contextmanager
def atomic_file(path: str, mode: str = 'wb'):
    """A file to write, opened beside `path` under a temporary name (`<path>.tmp.<host>.<pid>`, so processes
    writing the same path at once, on one machine or several, each write their own), flushed to disk and renamed
    over `path` when the block ends without an error; removed otherwise."""
    tmp = f'{path}.tmp.{socket.gethostname()}.{os.getpid()}'
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
