"""What a run reports: timestamped lines on the main process, TensorBoard scalars, a JSON-lines
`log.txt` of per-epoch stats, and the resolved configuration written beside the checkpoints."""
import json
import os
import time

from util.distributed import is_main


def log(*parts):
    if is_main():
        print(time.strftime('%H:%M:%S'), *parts, flush=True)


class RunLogger:
    """TensorBoard (when log_dir is set) and log.txt (when output_dir is set), main process only."""

    def __init__(self, output_dir, log_dir):
        self.output_dir = output_dir if is_main() else None
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
