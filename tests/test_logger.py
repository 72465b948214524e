"""util/logger.py: log.txt keeps one record per epoch across restarts."""
import json

from util.logger import RunLogger


def test_a_resumed_run_drops_the_records_it_will_write_again(tmp_path):
    """A run killed after logging epoch 2 but before epoch 2's checkpoint landed restarts at epoch 2: the record
    is dropped (and a line a kill cut short), the earlier ones stay, and the new epoch 2 is written once."""
    log = tmp_path / 'log.txt'
    log.write_text(''.join(json.dumps({'epoch': e, 'train_loss': e}) + '\n' for e in range(3)) + '{"epoch": 3, "tr')
    logger = RunLogger(str(tmp_path), None, start_epoch=2)
    assert [json.loads(line)['epoch'] for line in log.read_text().splitlines()] == [0, 1]
    logger.epoch({'epoch': 2, 'train_loss': 9})
    assert [json.loads(line) for line in log.read_text().splitlines()][-1] == {'epoch': 2, 'train_loss': 9}
    before = log.read_text()
    RunLogger(str(tmp_path), None, start_epoch=3)
    assert log.read_text() == before  # nothing to drop: the file is left as it is
