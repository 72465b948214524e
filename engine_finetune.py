"""The supervised step (fine-tuning or linear probing), from a loader batch to its loss, and evaluation."""
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from util.precision import autocast


def batch_loss(model: torch.nn.Module, criterion: Callable, batch, device: torch.device,
               mixup: Optional[Callable] = None) -> torch.Tensor:
    """engine.train_epoch's step: the classification loss of a (images, labels, ...) batch, after mixup/cutmix
    when enabled."""
    images = batch[0].to(device, non_blocking=True)
    labels = batch[1].to(device, non_blocking=True)
    if mixup is not None:
        images, labels = mixup(images, labels)
    return criterion(model(images), labels)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, precision: str) -> dict:
    """Top-1/top-5 accuracy (%) and mean loss over the evaluation set, summed exactly over processes."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast(precision, device):
            logits = model(images)
        logits = logits.float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        totals += torch.stack([F.cross_entropy(logits, labels, reduction='sum'), hits[:, 0].sum(),
                               hits.any(1).sum(), torch.tensor(len(labels), device=device)]).double()
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss, top1, top5, count = totals.tolist()
    return {'acc1': 100 * top1 / count, 'acc5': 100 * top5 / count, 'loss': loss / count}
