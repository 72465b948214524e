"""util/errors.py: the one user-facing line of a UserError, also when a loader worker re-raised it."""
from util.errors import UserError, one_line


def test_one_line_of_a_worker_reraised_error():
    wrapped = UserError('Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call '
                        'last):\n  File "x.py", line 1\nutil.errors.UserError: cannot read image /d/a.JPEG (bad)')
    assert one_line(wrapped) == 'cannot read image /d/a.JPEG (bad)'
    assert one_line(UserError('plain message')) == 'plain message'
