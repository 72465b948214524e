"""Learning-rate schedule: a pure function of the (fractional) epoch, applied at every optimizer step."""
import math


def cosine_lr(epoch, base_lr, min_lr, warmup_epochs, epochs):
    """Linear warm-up from 0 to base_lr over warmup_epochs, then a half-cycle cosine down to min_lr at epochs."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer, lr):
    """Set every group's lr, scaled by the group's `lr_scale` (layer-wise decay) where it has one."""
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)
