"""Files written whole or not at all: what a crash, a kill or a full disk leaves behind is the previous file,
never half of a new one."""
import contextlib
import os
import socket


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
