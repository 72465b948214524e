"""What a run reports: timestamped lines on the main process, TensorBoard scalars, a JSON-lines
`log.txt` of per-epoch stats, and the resolved configuration written beside the checkpoints."""
import json
import os
import time

from util.atomic import atomic_file
from util.distributed import is_main


def log(*parts):
    if is_main():
        print(time.strftime('%H:%M:%S'), *parts, flush=True)


def _epoch_of(line):
    """A log.txt record's epoch; a line a kill cut short counts as the newest (it is dropped)."""
    try:
        return json.loads(line)['epoch']
    except (ValueError, KeyError, TypeError):
        return float('inf')


def _keep_records_before(path, epoch):
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if _epoch_of(line) < epoch]
    if kept != lines:
        with atomic_file(path, 'w') as f:
            f.writelines(kept)


class RunLogger:
    """TensorBoard (when log_dir is set) and log.txt (when output_dir is set), main process only.

    log.txt holds one record per epoch however often the run was stopped: opening it for a run that starts at
    `start_epoch` drops the records of that epoch and later ones, which a run killed after logging an epoch but
    before its checkpoint landed had written (the resumed run writes them again)."""

    def __init__(self, output_dir, log_dir, start_epoch=0):
        self.output_dir = output_dir if is_main() else None
        if self.output_dir:
            _keep_records_before(os.path.join(self.output_dir, 'log.txt'), start_epoch)
        self.writer = None
        if is_main() and log_dir:
            from torch.utils.tensorboard import SummaryWriter
            os.makedirs(log_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir=log_dir)

    def scalars(self, step, **values):
        if self.writer:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def epoch(self, stats):
        if self.output_dir:
            with open(os.path.join(self.output_dir, 'log.txt'), 'a') as f:
                f.write(json.dumps(stats) + '\n')
        if self.writer:
            self.writer.flush()

    def config(self, config):
        if self.output_dir:
            with open(os.path.join(self.output_dir, 'config.json'), 'w') as f:
                json.dump(config, f, indent=2, sort_keys=True)

    def close(self):
        if self.writer:
            self.writer.close()
