"""Files written whole or not at all: what a crash, a kill or a full disk leaves behind is the previous file,
never half of a new one."""
import contextlib
import os


@contextlib.contextmanager
def atomic_file(path: str, mode: str = 'wb'):
    """A file to write, opened beside `path` under a temporary name (`<path>.tmp.<pid>`, so processes writing the
    same path at once each write their own), flushed to disk and renamed over `path` when the block ends
    without an error; removed otherwise."""
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
