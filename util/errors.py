"""The one exception type for problems a user can fix, and the helpers that raise and print it. It lives apart
from the command-line code so that every module can raise it without importing argument parsing."""


class UserError(Exception):
    """A problem the user can fix (bad path, bad flag, bad file); printed as one line, no traceback. Every
    process of a run meets it alike (flags, files, collective checks), so rank 0 alone prints it."""


class LocalError(UserError):
    """A UserError that one process meets alone, in the data it was handed; printed by that process."""


def check(condition, message):
    """Raise a UserError with `message` unless `condition` holds."""
    if not condition:
        raise UserError(message)


def one_line(exc):
    """The user-facing line of a UserError, also when a DataLoader worker re-raised it with its traceback."""
    msg = str(exc).strip()
    if 'Original Traceback' in msg:
        msg = msg.splitlines()[-1].split(': ', 1)[-1]
    return msg.splitlines()[0] if msg else type(exc).__name__
