"""The training epoch every entry point shares: per-step lr schedule, gradient accumulation without all-reduce on
the accumulating steps, mixed precision, checks without a host sync per step, and stop and periodic-save
requests. What a step computes is the caller's `batch_loss` (engine_pretrain, engine_finetune); the epoch loop
around this is inline in each main_*.py."""
import contextlib
import dataclasses
import datetime
import time
from typing import Any, Callable, Optional

import torch

from util.data import BadImages
from util.distributed import all_reduce_any, all_reduce_mean, all_reduce_sum, is_main, world_size
from util.errors import UserError
from util.logger import RunLogger, log
from util.lr_sched import cosine_lr, set_lr
from util.precision import autocast
from util.preemption import STOP


@dataclasses.dataclass(frozen=True)
class EpochProgress:
    """An interrupted epoch's sums so far, carried in its mid-epoch checkpoint (as a dict) so that the resumed
    epoch's log.txt record is the one an uninterrupted epoch writes: its loss the mean over all the epoch's
    iterations, not only those after the restart."""
    loss_sum: float = 0.0  # the processes' mean of their summed per-iteration losses
    iters: int = 0
    seconds: float = 0.0
    data_wait_seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class EpochStats:
    """What train_epoch did: the mean loss of the iterations it ran, the last lr, the throughput; for the epoch
    loop, the iterations of the epoch done and whether a stop request ended the epoch early (it is saved)."""
    loss: float
    lr: float
    images_per_sec: float
    iters_done: int
    stopped: bool
    data_wait: float = 0.0  # the fraction of the epoch's time spent waiting for the next batch
    weights_ok: bool = True  # the last check found the weights fit to save (see weights_unstable)

    def logged(self) -> dict:
        """The statistics that go to log.txt, named for it (the loop's bookkeeping stays out)."""
        return {'train_loss': self.loss, 'train_lr': self.lr, 'train_images_per_sec': self.images_per_sec}


DATA_WAIT_WARNING = 0.10  # above this fraction of an epoch spent waiting for data, the log says so
# The weights' norm grows a few percent between checks in healthy training, by orders of magnitude after a
# step that poisons them (an lr far too high): a growth past this blocks the save.
WEIGHT_GROWTH_LIMIT = 4.0


def _norm(params):
    with torch.no_grad():
        return torch.nn.utils.get_total_norm(params)


def weights_unstable(norm: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Whether weights of norm `norm` (all the model's parameters together, frozen ones too: a linear probe's
    small fresh head legitimately grows fast relative to itself) are unfit to checkpoint: non-finite, or more
    than WEIGHT_GROWTH_LIMIT times their norm at the previous check. A non-finite gradient ends up here as well
    (it makes the weights non-finite, or fp16's scaler skips the step), and so does an exploding one when it
    moves the weights. A device tensor: no host sync of its own.

    The next check compares with the weights this one refused: if they trained on for a whole window with
    finite losses and no further jump, they are the run's weights now and are saved again."""
    return ~torch.isfinite(norm) | (norm > WEIGHT_GROWTH_LIMIT * previous)


def _hms(seconds):
    return str(datetime.timedelta(seconds=int(seconds)))


def train_epoch(model: torch.nn.Module, loader, batch_loss: Callable[[Any], torch.Tensor],
                optimizer: torch.optim.Optimizer, scaler, epoch: int, args, device: torch.device,
                logger: RunLogger, start_iter: int = 0, bad_images: Optional[BadImages] = None,
                save: Optional[Callable[[int, int, dict], None]] = None,
                progress: Optional[dict] = None) -> EpochStats:
    """Run one epoch from iteration `start_iter`; `batch_loss(batch)` returns one batch's loss (called under
    autocast). Batches are (images, labels, unreadable paths) from util.data.train_loader. `progress` is the
    EpochProgress (as a dict) of the checkpoint this epoch resumes from, if any.

    Every --print_freq iterations, at an optimizer-step boundary, all processes agree on: a non-finite loss
    (stop before anything is saved), a stop request (util.preemption.STOP: `save(epoch, iterations done,
    EpochProgress as a dict)`, a line, and return early), whether --save_every_min minutes passed since the last
    save (then `save` runs too), too many unreadable images; and the loss is logged. An incomplete accumulation
    window at the end of the epoch is dropped.

    A save is skipped, with a line, when the weights look poisoned (see weights_unstable): the last step's
    weights have not yet produced a loss the check has seen, and a checkpoint that turns every resume into the
    same NaN is worse than an older one.
    """
    model.train()
    accum = args.accum_iter
    num_iters = iterations_per_epoch(loader, accum)
    if num_iters == 0:
        raise UserError(f'--accum_iter {accum} exceeds the {loader.sampler.batches_per_epoch} iterations of an '
                        f'epoch; lower --accum_iter or --batch_size')
    steps_per_epoch = num_iters // accum
    images_per_iter = args.batch_size * world_size()
    optimizer.zero_grad(set_to_none=True)
    fields = {f.name for f in dataclasses.fields(EpochProgress)}  # a checkpoint of another version: what it has
    carried = EpochProgress(**{k: v for k, v in (progress or {}).items() if k in fields}) if start_iter else \
        EpochProgress()
    loss_sum = torch.tensor(carried.loss_sum, device=device)
    window_sum = torch.zeros((), device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    weights = list(model.parameters())
    weight_norm = _norm(weights)  # at the previous check
    unstable = False  # what the last check found (see weights_unstable)
    window_iters, lr, stopped, it = 0, optimizer.param_groups[0]['lr'], False, start_iter - 1
    epoch_start = window_start = last_save = ready = time.time()
    window_wait = epoch_wait = 0.0

    def so_far():  # the epoch's sums up to iteration `it`, the part before a restart included (a collective)
        return EpochProgress(all_reduce_mean(loss_sum).item(), carried.iters + it + 1 - start_iter,
                             carried.seconds + time.time() - epoch_start, carried.data_wait_seconds + epoch_wait)
    gaps = []  # CUDA: (this step's work done, next batch handed over) event pairs of the window
    cuda = device.type == 'cuda'
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    # the range ends the epoch before a trailing incomplete accumulation window is even loaded
    for it, batch in zip(range(start_iter, num_iters), loader):
        # time lost waiting for this batch (the epoch's first waits for workers to start: left out)
        if it > start_iter:
            if cuda:  # the device's idle gap: the host queues work ahead, so its own wait would overstate it
                arrived = torch.cuda.Event(enable_timing=True)
                arrived.record()
                gaps.append((ready, arrived))
            else:
                waited = time.time() - ready
                window_wait += waited
                epoch_wait += waited
        if it % accum == 0:
            lr = cosine_lr(epoch + (it // accum) / steps_per_epoch, args.lr, args.min_lr,
                           args.warmup_epochs, args.epochs)
            set_lr(optimizer, lr)
        if bad_images is not None:
            bad_images.add(batch[2])
        update = (it + 1) % accum == 0
        # DDP reads the sync decision in forward, so forward and backward both sit inside no_sync.
        sync = contextlib.nullcontext() if update or not args.distributed else model.no_sync()
        with sync:
            with autocast(args.precision, device):
                loss = batch_loss(batch)
            scaler.scale(loss / accum).backward()
        if update:
            if args.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        loss = loss.detach()
        nonfinite |= ~torch.isfinite(loss)
        loss_sum += loss
        window_sum += loss
        window_iters += 1
        if update and (window_iters >= args.print_freq or it + 1 == num_iters):
            # the main process's clock decides when a periodic save is due, so all processes save together
            save_due = save is not None and is_main() and time.time() - last_save > 60 * args.save_every_min
            requests = torch.tensor([STOP.requested, save_due], device=device)
            norm = _norm(weights)
            exploding, growth, weight_norm = weights_unstable(norm, weight_norm), norm / weight_norm, norm
            bad_loss, unstable, stopped, save_due = all_reduce_any(torch.cat([nonfinite[None], exploding[None],
                                                                              requests]))
            if bad_loss:
                raise UserError(f'the loss became NaN or infinite in epoch {epoch}, iteration {it}; nothing '
                                f'was saved after the last good checkpoint: resume from it with a lower '
                                f'--blr or --precision fp32')
            if bad_images is not None:
                bad_images.check()
            window_loss = all_reduce_mean(window_sum).item() / window_iters  # synchronises: the gaps are timed
            if gaps:
                waited = sum(done.elapsed_time(arrived) for done, arrived in gaps) / 1000
                window_wait, epoch_wait, gaps = window_wait + waited, epoch_wait + waited, []
            elapsed = time.time() - window_start
            speed, wait = window_iters * images_per_iter / elapsed, 100 * window_wait / elapsed
            memory = {'peak_gpu_gib': torch.cuda.max_memory_allocated(device) / 2 ** 30} if cuda else {}
            logger.scalars(epoch * num_iters + it + 1, train_loss=window_loss, lr=lr, images_per_sec=speed,
                           data_wait_pct=wait, **memory)
            left = num_iters - it - 1
            run_left = left + (args.epochs - epoch - 1) * num_iters
            per_iter = images_per_iter / speed
            log(f'epoch {epoch} [{it + 1}/{num_iters}] loss {window_loss:.4f} lr {lr:.3e} {speed:.1f} img/s, '
                f'data wait {wait:.0f}%' + (f', peak {memory["peak_gpu_gib"]:.1f} GiB' if cuda else '') +
                f', eta epoch {_hms(left * per_iter)} run {_hms(run_left * per_iter)}')
            # a stop on the epoch's last iteration lets the loop end the epoch properly (evaluation, its save)
            stopped = stopped and it + 1 < num_iters
            wants_save = save is not None and (stopped or (save_due and it + 1 < num_iters))
            if wants_save and unstable:
                log(f'not saving in epoch {epoch} after iteration {it + 1}: the weights\' norm grew '
                    f'{growth.item():.3g}x since the last check (to {norm.item():.3g}); training looks unstable, '
                    f'the last checkpoint stays the one to resume from')
            elif wants_save:
                save(epoch, it + 1, dataclasses.asdict(so_far()))
                last_save = time.time()
            if stopped:
                saved = save is not None and not unstable
                log(f'stopped in epoch {epoch} after iteration {it + 1}' + (', checkpoint saved; run the same '
                    'command again to continue from there' if saved else ''))
                break
            window_sum.zero_()
            window_iters, window_wait, window_start = 0, 0.0, time.time()
        if cuda:
            ready = torch.cuda.Event(enable_timing=True)  # reached once the device has done this step's work
            ready.record()
        else:
            ready = time.time()

    total = so_far()
    elapsed, waited = total.seconds, total.data_wait_seconds
    if waited > DATA_WAIT_WARNING * elapsed and not stopped:
        log(f'the input held training back in epoch {epoch}: {100 * waited / elapsed:.0f}% of the time went to '
            f'waiting for the next batch; more --num_workers (now {args.num_workers}), --gpu_decode '
            f'(pretraining) or tar shards (tools/make_shards.py) feed it faster')
    return EpochStats(loss=total.loss_sum / max(total.iters, 1), lr=lr,
                      images_per_sec=total.iters * images_per_iter / elapsed, iters_done=it + 1, stopped=stopped,
                      data_wait=waited / elapsed, weights_ok=not unstable)


def save_epoch(stats: EpochStats, save: Callable[[int], None], epoch: int, last: bool) -> bool:
    """The epoch's checkpoint, unless the epoch's last check found the weights unfit to save (then a line, or for
    the run's last epoch an error: a run must not end 'finished' on weights it refused). Whether it saved."""
    if stats.weights_ok:
        save(epoch)
        return True
    if last:
        raise UserError(f'the weights exploded in the final epoch {epoch} (see above) and were not saved; the last '
                        f'checkpoint in --output_dir is the one to resume from, with a lower --blr')
    log(f'not saving epoch {epoch}: its last check found the weights exploding; the last checkpoint stays the '
        f'one to resume from')
    return False


def end_epoch(stats: EpochStats, save: Callable[[int], None], epoch: int, last: bool) -> bool:
    """Save the finished epoch (save_epoch), then whether the run goes on: False when a process was asked to stop
    during the epoch's last steps or its evaluation (the epoch's checkpoint is then the place to stop). All
    processes call it together."""
    saved = save_epoch(stats, save, epoch, last)
    return last or not stop_requested(f'after epoch {epoch}' + (', checkpoint saved' if saved else ''))


def iterations_per_epoch(loader, accum_iter: int) -> int:
    """The iterations train_epoch runs per epoch (a trailing incomplete accumulation window dropped): epochs
    times this is the step axis of every TensorBoard scalar, training's and evaluation's alike."""
    return loader.sampler.batches_per_epoch // accum_iter * accum_iter


def stop_requested(where: str) -> bool:
    """Whether any process was asked to stop (a signal between epochs or before the first); logs where the run
    stopped. All processes call it together."""
    if not all_reduce_sum(int(STOP.requested)):
        return False
    log(f'stopped {where}; run the same command again to continue')
    return True


def log_run_end(start_time: float, completed: bool, extra: str = '') -> None:
    """The run's last line: a finished run's training time, or a stopped run's, saying how it continues (the
    process then exits with util.cli.EXIT_STOPPED)."""
    took = _hms(time.time() - start_time)
    if completed:
        log(f'training time {took}{extra}')
    else:
        log(f'stopped after {took} of training{extra}; resumable: the same command continues the run')
