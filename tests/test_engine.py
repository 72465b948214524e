"""engine.py: one training epoch's accumulation windows, its statistics and what it says about its input."""
import argparse
import time

import pytest
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
                              distributed=False, clip_grad=None, precision='fp32', print_freq=100, save_every_min=30,
                              num_workers=0)
    loader, steps = CountingLoader(5), []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    stats = train_epoch(model, loader, lambda batch: model(batch[0]).sum() * 0 + 1.0, optimizer,
                        torch.amp.GradScaler('cpu', enabled=False), 0, args, torch.device('cpu'), RunLogger(None, None))
    assert (stats.loss, stats.iters_done, len(steps), loader.loaded) == (1.0, 4, 2, 4)


class SlowLoader(CountingLoader):
    """A loader that takes `delay` seconds for every batch, as a starved input pipeline does."""

    def __init__(self, count, delay):
        super().__init__(count)
        self.delay = delay

    def __iter__(self):
        for batch in super().__iter__():
            time.sleep(self.delay)
            yield batch


class Scalars:
    def __init__(self):
        self.logged = []

    def scalars(self, step, **values):
        self.logged.append(values)


@pytest.mark.parametrize('delay', [0.0, 0.1])
def test_data_wait_rises_when_the_loader_is_slowed(delay, capsys):
    """The share of step time spent waiting for the next batch: in every log line and TensorBoard scalar, and in
    the epoch's stats; past 10% over an epoch one line names the remedies. The step itself takes ~50 ms."""
    model = torch.nn.Linear(1, 1)

    def step(batch):
        time.sleep(0.05)
        return model(batch[0]).sum()

    args = argparse.Namespace(accum_iter=1, batch_size=1, lr=0.1, min_lr=0.0, warmup_epochs=0, epochs=1,
                              distributed=False, clip_grad=None, precision='fp32', print_freq=4, save_every_min=30,
                              num_workers=3)
    logger = Scalars()
    stats = train_epoch(model, SlowLoader(9, delay), step, torch.optim.SGD(model.parameters(), lr=0.1),
                        torch.amp.GradScaler('cpu', enabled=False), 0, args, torch.device('cpu'), logger)
    out = capsys.readouterr().out
    waits = [values['data_wait_pct'] for values in logger.logged]
    assert len(waits) == 3 and all(f'data wait {w:.0f}%' in out for w in waits)  # at iterations 4, 8, 9
    warned = 'the input held training back in epoch 0' in out
    if delay:
        assert stats.data_wait > 0.4 and min(waits) > 30 and warned  # 2/3 of the time, less the first batch's
        assert '--num_workers (now 3), --gpu_decode (pretraining) or tar shards (tools/make_shards.py)' in out
    else:
        assert stats.data_wait < 0.1 and max(waits) < 10 and not warned
