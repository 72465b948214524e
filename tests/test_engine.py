"""engine.py: one training epoch's accumulation windows, its statistics and what it says about its input."""
import argparse
import dataclasses
import signal
import time

import pytest
import torch

from util.logger import RunLogger
from engine import WEIGHT_GROWTH_LIMIT, EpochStats, end_epoch, save_epoch, train_epoch, weights_unstable
from util.errors import UserError
from util.preemption import STOP


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


def epoch_args(**changes):
    return argparse.Namespace(**{**dict(accum_iter=1, batch_size=1, lr=0.1, min_lr=0.1, warmup_epochs=0, epochs=1,
                                        distributed=False, clip_grad=None, precision='fp32', print_freq=1,
                                        save_every_min=1e-9, num_workers=0), **changes})


def test_weights_unstable_on_non_finite_or_exploding_norms():
    norm = torch.tensor
    assert not weights_unstable(norm(3.0), norm(1.0)) and not weights_unstable(norm(0.5), norm(1.0))
    assert weights_unstable(norm(WEIGHT_GROWTH_LIMIT * 1.01), norm(1.0))
    assert weights_unstable(norm(float('nan')), norm(1.0)) and weights_unstable(norm(float('inf')), norm(1.0))


def test_a_save_after_a_step_that_blew_up_the_weights_is_skipped_and_the_next_one_is_not(capsys):
    """Iteration 3's gradient is 1e9 times too large: its weights are finite but huge. The periodic save due at
    its check is skipped (with a line); the next check compares with those weights and saves again."""
    model = torch.nn.Linear(1, 1)
    calls = []

    def step(batch):
        return model(batch[0]).sum() * (1e9 if len(calls) == 2 else 1.0)  # after the saves at iterations 1, 2

    stats = train_epoch(model, CountingLoader(6), step, torch.optim.SGD(model.parameters(), lr=0.1),
                        torch.amp.GradScaler('cpu', enabled=False), 0, epoch_args(), torch.device('cpu'),
                        RunLogger(None, None), save=lambda epoch, it, progress: calls.append(it))
    out = capsys.readouterr().out
    assert calls == [1, 2, 4, 5] and stats.weights_ok  # iteration 3's save skipped; the epoch's last is the loop's
    assert "not saving in epoch 0 after iteration 3: the weights' norm grew" in out


def test_a_resumed_epoch_carries_the_interrupted_part_of_its_statistics():
    """Resumed at iteration 3 of 6 with the first three losses summing to 3.0: the epoch's loss is the mean over
    all six iterations (the last three are 2.0 each), and a save hands on the sums so far."""
    model = torch.nn.Linear(1, 1)
    saved = []
    stats = train_epoch(model, CountingLoader(6), lambda batch: model(batch[0]).sum() * 0 + 2.0,
                        torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler('cpu', enabled=False), 0,
                        epoch_args(), torch.device('cpu'), RunLogger(None, None), start_iter=3,
                        save=lambda epoch, it, progress: saved.append((it, progress)),
                        progress={'loss_sum': 3.0, 'iters': 3, 'seconds': 1.0, 'data_wait_seconds': 0.5})
    assert stats.loss == pytest.approx(1.5) and stats.iters_done == 6
    assert [it for it, _ in saved] == [4, 5]
    assert saved[0][1]['loss_sum'] == pytest.approx(5.0) and saved[0][1]['iters'] == 4
    assert saved[0][1]['seconds'] > 1.0 and saved[0][1]['data_wait_seconds'] >= 0.5


def test_an_epoch_whose_weights_exploded_is_not_saved_and_a_final_one_is_an_error(capsys):
    saved = []
    bad = EpochStats(loss=1.0, lr=0.1, images_per_sec=1.0, iters_done=4, stopped=False, weights_ok=False)
    assert not save_epoch(bad, saved.append, 3, last=False) and saved == []
    assert 'not saving epoch 3' in capsys.readouterr().out
    with pytest.raises(UserError, match='the weights exploded in the final epoch 3'):
        save_epoch(bad, saved.append, 3, last=True)
    assert save_epoch(dataclasses.replace(bad, weights_ok=True), saved.append, 3, last=True) and saved == [3]


def test_an_epoch_ends_saved_and_a_stop_request_ends_the_run_after_it_unless_it_was_the_last(capsys, monkeypatch):
    """The epoch loops' tail (main_pretrain, main_classification): the checkpoint first, then a signal that came
    during the epoch's last steps or its evaluation stops the run there; after the final epoch the run is done."""
    good, saved = EpochStats(loss=1.0, lr=0.1, images_per_sec=1.0, iters_done=4, stopped=False), []
    assert end_epoch(good, saved.append, 2, last=False) and saved == [2]
    monkeypatch.setattr(STOP, 'signal', signal.SIGTERM)
    assert STOP.requested
    assert not end_epoch(good, saved.append, 3, last=False) and saved == [2, 3]
    assert 'stopped after epoch 3, checkpoint saved' in capsys.readouterr().out
    assert end_epoch(good, saved.append, 4, last=True) and saved == [2, 3, 4]
    bad = dataclasses.replace(good, weights_ok=False)
    assert not end_epoch(bad, saved.append, 5, last=False) and saved == [2, 3, 4]
    assert 'stopped after epoch 5;' in capsys.readouterr().out
