"""One epoch of supervised training (fine-tuning or linear probing), and evaluation."""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from util.precision import autocast
from util.train_loop import train_epoch


def train_one_epoch(model, criterion, loader, optimizer, scaler, epoch, args, device, logger, mixup=None, **loop):
    """Classification loss on each batch, after mixup/cutmix when enabled. `loop`: train_epoch's options."""
    def compute_loss(batch):
        images = batch[0].to(device, non_blocking=True)
        labels = batch[1].to(device, non_blocking=True)
        if mixup is not None:
            images, labels = mixup(images, labels)
        return criterion(model(images), labels)

    return train_epoch(model, loader, compute_loss, optimizer, scaler, epoch, args, device, logger, **loop)


@torch.no_grad()
def evaluate(model, loader, device, precision):
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
