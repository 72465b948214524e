"""The training epoch every entry point shares: per-step lr schedule, gradient accumulation without
all-reduce on the accumulating steps, mixed precision, and checks without a host sync per step."""
import contextlib
import datetime
import time

import torch

from util.errors import UserError
from util.distributed import all_reduce_any, all_reduce_mean, all_reduce_sum, is_main, world_size
from util.logger import log
from util.lr_sched import cosine_lr, set_lr
from util.precision import autocast
from util.preemption import STOP


def _hms(seconds):
    return str(datetime.timedelta(seconds=int(seconds)))


def train_epoch(model, loader, compute_loss, optimizer, scaler, epoch, args, device, logger,
                start_iter=0, stop=None, bad_images=None, save=None):
    """Run one epoch from iteration `start_iter`; `compute_loss(batch)` returns one batch's loss (called
    under autocast). Batches are (images, labels, unreadable paths) from util.data.train_loader.

    Every --print_freq iterations, at an optimizer-step boundary, all processes agree on: a non-finite loss
    (stop before anything is saved), a stop request (return early, to be checkpointed), whether
    --save_every_min minutes passed since the last save (then `save(epoch, iters_done)` runs), too many
    unreadable images; and the loss is logged. An incomplete accumulation window at the end of the epoch
    is dropped. Returns {'loss', 'lr', 'images_per_sec'} (the epoch's statistics, `logged`), and for the
    epoch loop 'iters_done' (iterations of the epoch done), 'stopped' (by a stop request) and 'epoch_done'.
    """
    model.train()
    accum = args.accum_iter
    num_iters = loader.sampler.batches_per_epoch // accum * accum
    if num_iters == 0:
        raise UserError(f'--accum_iter {accum} exceeds the {loader.sampler.batches_per_epoch} iterations of an '
                        f'epoch; lower --accum_iter or --batch_size')
    steps_per_epoch = num_iters // accum
    images_per_iter = args.batch_size * world_size()
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    window_sum = torch.zeros((), device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    window_iters, lr, stopped, it = 0, optimizer.param_groups[0]['lr'], False, start_iter - 1
    epoch_start = window_start = last_save = time.time()

    # the range ends the epoch before a trailing incomplete accumulation window is even loaded
    for it, batch in zip(range(start_iter, num_iters), loader):
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
                loss = compute_loss(batch)
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
            requests = torch.tensor([stop is not None and stop.requested, save_due], device=device)
            bad_loss, stopped, save_due = all_reduce_any(torch.cat([nonfinite[None], requests]))
            if bad_loss:
                raise UserError(f'the loss became NaN or infinite in epoch {epoch}, iteration {it}; nothing '
                                f'was saved after the last good checkpoint: resume from it with a lower '
                                f'--blr or --precision fp32')
            if bad_images is not None:
                bad_images.check()
            window_loss = all_reduce_mean(window_sum).item() / window_iters
            speed = window_iters * images_per_iter / (time.time() - window_start)
            logger.scalars(epoch * num_iters + it + 1, train_loss=window_loss, lr=lr, images_per_sec=speed)
            left = num_iters - it - 1
            run_left = left + (args.epochs - epoch - 1) * num_iters
            per_iter = images_per_iter / speed
            log(f'epoch {epoch} [{it + 1}/{num_iters}] loss {window_loss:.4f} lr {lr:.3e} {speed:.1f} img/s, '
                f'eta epoch {_hms(left * per_iter)} run {_hms(run_left * per_iter)}')
            if save_due and not stopped and it + 1 < num_iters:
                save(epoch, it + 1)
                last_save = time.time()
            window_sum.zero_()
            window_iters, window_start = 0, time.time()
            if stopped:
                break

    done = it + 1 - start_iter
    return {'loss': all_reduce_mean(loss_sum).item() / max(done, 1), 'lr': lr,
            'images_per_sec': done * images_per_iter / (time.time() - epoch_start),
            'iters_done': it + 1, 'stopped': stopped, 'epoch_done': it + 1 == num_iters}


LOGGED = ('loss', 'lr', 'images_per_sec')


def logged(stats):
    """The statistics of train_epoch's result that go to log.txt, named for it."""
    return {f'train_{k}': stats[k] for k in LOGGED}


def train_epochs(args, loader, start, run_epoch, after_epoch, save):
    """The epoch loop of every entry point, from `start` = (epoch, iteration) of a resume.

    run_epoch(epoch, start_iter, stop, save) -> stats from train_epoch; after_epoch(epoch, stats) evaluates
    and logs; save(epoch, resume_iter) checkpoints (resume_iter > 0: mid-epoch). On a stop signal the run
    saves where it stopped and returns False; rerunning the same command continues from there.
    """
    if all_reduce_sum(int(STOP.requested)):
        log('stopped before training started, nothing new to save; run the same command again to go on')
        return False
    start_epoch, start_iter = start
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch, start_iter)
        stats = run_epoch(epoch, start_iter, STOP, save)
        if stats['stopped'] and not stats['epoch_done']:
            save(epoch, stats['iters_done'])
            log(f'stopped in epoch {epoch} after iteration {stats["iters_done"]}, checkpoint saved; run the same '
                f'command again to continue from there')
            return False
        start_iter = 0
        after_epoch(epoch, stats)
        save(epoch, 0)
        # a signal during the epoch's last steps or its evaluation: the epoch's checkpoint is the place to stop
        if epoch + 1 < args.epochs and all_reduce_sum(int(STOP.requested)):
            log(f'stopped after epoch {epoch}, checkpoint saved; run the same command again to continue')
            return False
    return True
