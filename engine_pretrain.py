"""One epoch of MILAN pretraining."""
import contextlib
import time

import torch

from util.cli import UserError
from util.data import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, renormalize, to_device_normalized
from util.distributed import all_reduce_any, all_reduce_mean, world_size
from util.logger import log
from util.lr_sched import cosine_lr, set_lr
from util.precision import autocast


def teacher_view(images, teacher_input_norm):
    """The teacher sees the student's batch; by default with ImageNet normalisation as released."""
    if teacher_input_norm == 'clip':
        return renormalize(images, IMAGENET_MEAN, IMAGENET_STD, CLIP_MEAN, CLIP_STD)
    return images


def train_one_epoch(model, teacher, loader, optimizer, scaler, epoch, args, device, logger):
    """Train for one epoch; returns {'loss', 'lr', 'images_per_sec'} averaged over all processes.

    The loss stays on the device between log points (no host sync per step); a non-finite loss is
    detected at the next log point and stops the run before anything is saved.
    """
    model.train()
    accum = args.accum_iter
    num_iters = len(loader) // accum * accum
    steps_per_epoch = num_iters // accum
    images_per_iter = args.batch_size * world_size()
    optimizer.zero_grad(set_to_none=True)

    loss_sum = torch.zeros((), device=device)
    window_sum = torch.zeros((), device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    window_iters, lr = 0, optimizer.param_groups[0]['lr']
    epoch_start = window_start = time.time()

    for it, (images, _) in enumerate(loader):
        if it >= num_iters:
            break
        if it % accum == 0:
            lr = cosine_lr(epoch + (it // accum) / steps_per_epoch, args.lr, args.min_lr,
                           args.warmup_epochs, args.epochs)
            set_lr(optimizer, lr)
        images = to_device_normalized(images, device)
        update = (it + 1) % accum == 0
        sync = contextlib.nullcontext() if update or not args.distributed else model.no_sync()
        with sync:
            with autocast(args.precision, device):
                targets = importance = None
                if teacher is not None:
                    targets, importance = teacher(teacher_view(images, args.teacher_input_norm))
                loss, _, _ = model(images, targets, importance if args.attn_mask else None, args.mask_ratio)
            scaler.scale(loss / accum).backward()
        if update:
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
            step = epoch * num_iters + it + 1
            logger.scalars(step, train_loss=window_loss, lr=lr, images_per_sec=speed)
            log(f'epoch {epoch} [{it + 1}/{num_iters}] loss {window_loss:.4f} lr {lr:.3e} {speed:.1f} img/s')
            window_sum.zero_()
            window_iters, window_start = 0, time.time()

    return {'loss': all_reduce_mean(loss_sum).item() / max(num_iters, 1), 'lr': lr,
            'images_per_sec': num_iters * images_per_iter / (time.time() - epoch_start)}
