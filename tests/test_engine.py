"""engine.py: one training epoch's accumulation windows and its statistics."""
import argparse

import torch

from util.logger import RunLogger
from engine import train_epoch


class CountingLoader:
    """`count` batches; remembers how many were actually loaded."""

    def __init__(self, count):
        self.sampler, self.loaded = argparse.Namespace(batches_per_epoch=count), 0

    def __iter__(self):
        for _ in range(self.sampler.batches_per_epoch):
            self.loaded += 1
            yield torch.ones(1), None, []


def test_epoch_drops_the_incomplete_accumulation_window_and_counts_what_ran():
    """5 batches with --accum_iter 2: 4 iterations, 2 updates, the 5th batch never loaded, and the epoch's
    mean loss is the mean of the 4 losses (not divided by 5)."""
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = argparse.Namespace(accum_iter=2, batch_size=1, lr=0.1, min_lr=0.0, warmup_epochs=0, epochs=1,
                              distributed=False, clip_grad=None, precision='fp32', print_freq=100, save_every_min=30)
    loader, steps = CountingLoader(5), []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    stats = train_epoch(model, loader, lambda batch: model(batch[0]).sum() * 0 + 1.0, optimizer,
                        torch.amp.GradScaler('cpu', enabled=False), 0, args, torch.device('cpu'), RunLogger(None, None))
    assert (stats.loss, stats.iters_done, len(steps), loader.loaded) == (1.0, 4, 2, 4)
