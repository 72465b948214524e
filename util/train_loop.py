"""The training epoch every entry point shares: per-step lr schedule, gradient accumulation without
all-reduce on the accumulating steps, mixed precision, and logging without a host sync per step."""
import contextlib
import time

import torch

from util.cli import UserError
from util.distributed import all_reduce_any, all_reduce_mean, world_size
from util.logger import log
from util.lr_sched import cosine_lr, set_lr
from util.precision import autocast


def train_epoch(model, loader, compute_loss, optimizer, scaler, epoch, args, device, logger):
    """Run one epoch; `compute_loss(batch)` returns the loss of one batch (called under autocast).

    Losses stay on the device between log points; a non-finite loss is caught at the next log point, on
    every process at once, and stops the run before anything is saved. An incomplete accumulation window
    at the end of the epoch is dropped. Returns {'loss', 'lr', 'images_per_sec'} over all processes.
    """
    model.train()
    accum = args.accum_iter
    num_iters = len(loader) // accum * accum
    if num_iters == 0:
        raise UserError(f'--accum_iter {accum} exceeds the {len(loader)} iterations of an epoch; '
                        f'lower --accum_iter or --batch_size')
    steps_per_epoch = num_iters // accum
    images_per_iter = args.batch_size * world_size()
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    window_sum = torch.zeros((), device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    window_iters, lr = 0, optimizer.param_groups[0]['lr']
    epoch_start = window_start = time.time()

    for it, batch in enumerate(loader):
        if it >= num_iters:
            break
        if it % accum == 0:
            lr = cosine_lr(epoch + (it // accum) / steps_per_epoch, args.lr, args.min_lr,
                           args.warmup_epochs, args.epochs)
            set_lr(optimizer, lr)
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
        if (it + 1) % args.print_freq == 0 or it + 1 == num_iters:
            if all_reduce_any(nonfinite):
                raise UserError(f'the loss became NaN or infinite in epoch {epoch}, iteration {it}; nothing '
                                f'was saved after the last good checkpoint: resume from it with a lower '
                                f'--blr or --precision fp32')
            window_loss = all_reduce_mean(window_sum).item() / window_iters
            speed = window_iters * images_per_iter / (time.time() - window_start)
            logger.scalars(epoch * num_iters + it + 1, train_loss=window_loss, lr=lr, images_per_sec=speed)
            log(f'epoch {epoch} [{it + 1}/{num_iters}] loss {window_loss:.4f} lr {lr:.3e} {speed:.1f} img/s')
            window_sum.zero_()
            window_iters, window_start = 0, time.time()

    return {'loss': all_reduce_mean(loss_sum).item() / max(num_iters, 1), 'lr': lr,
            'images_per_sec': num_iters * images_per_iter / (time.time() - epoch_start)}
