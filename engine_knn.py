"""Weighted k-NN classification of frozen features, DINO's protocol: every image's L2-normalised feature, extracted
sharded over processes; each validation image takes the vote of its k most similar training images (cosine
similarity), each vote weighted by exp(similarity / temperature). It tells early whether a pretraining run learns
(main_pretrain's --knn_every) and compares encoders without training a head (main_knn.py)."""
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from util.data import eval_loader, eval_transform, image_folder
from util.distributed import gather_strided
from util.errors import UserError
from util.precision import autocast


class Readable(Dataset):
    """A dataset whose unreadable images come out marked (None, False) instead of raising: one bad file must not
    stop an evaluation, nor leave the other processes waiting in the feature exchange."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            return self.dataset[i][0], True
        except UserError:  # LocalError too: util.data's unreadable-image error
            return None, False


def collate_readable(batch):
    """(the readable images stacked, or None; which of the batch they are)."""
    images = [image for image, ok in batch if ok]
    return (torch.stack(images) if images else None), torch.tensor([ok for _, ok in batch])


@torch.no_grad()
def extract(encode: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, batch_size: int, num_workers: int,
            device: torch.device, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """([len(dataset), D] float32 L2-normalised features, [len(dataset)] bool: readable) in dataset order, on every
    process: each process encodes every world-th image (util.data.eval_loader's shards) and the processes
    exchange them. An unreadable image's row is zeros, marked unreadable."""
    first = next((image for image, ok in (Readable(dataset)[i] for i in range(len(dataset))) if ok), None)
    if first is None:
        raise UserError(f'none of the {len(dataset)} evaluation images is readable')
    with autocast(precision, device):
        width = encode(first[None].to(device)).shape[-1]
    loader = eval_loader(Readable(dataset), batch_size, num_workers, device.type == 'cuda', collate_readable)
    features = [torch.zeros(0, width, device=device)]
    readable = [torch.zeros(0, dtype=torch.bool, device=device)]
    for images, ok in loader:
        rows = torch.zeros(len(ok), width, device=device)
        if images is not None:
            with autocast(precision, device):
                rows[ok.to(device)] = F.normalize(encode(images.to(device, non_blocking=True)).float(), dim=-1)
        features.append(rows)
        readable.append(ok.to(device))
    return (gather_strided(torch.cat(features), len(dataset)),
            gather_strided(torch.cat(readable).to(torch.uint8), len(dataset)).bool())  # gloo has no bool


def knn_votes(train: torch.Tensor, train_labels: torch.Tensor, val: torch.Tensor, num_classes: int, k: int = 20,
              temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """[V, num_classes] summed weights exp(cos / temperature) of each validation feature's k nearest training
    features (rows L2-normalised), per class, all scaled by the same exp(-1 / temperature), which changes no
    vote. Chunked over the validation set, so the similarity matrix stays small."""
    k = min(k, len(train))
    votes = []
    for start in range(0, len(val), chunk):
        similarity, nearest = (val[start:start + chunk] @ train.T).topk(k, dim=1)
        weights = ((similarity - 1) / temperature).exp()  # exp(cos / T) scaled by exp(-1 / T): no overflow at small T
        votes.append(torch.zeros(len(weights), num_classes, device=val.device).scatter_add_(
            1, train_labels[nearest], weights))
    return torch.cat(votes) if votes else torch.zeros(0, num_classes, device=val.device)


def top_k_accuracy(votes: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 and top-5 accuracy (%) of the votes; on equal votes the lower class index ranks first."""
    order = torch.sort(votes, dim=1, descending=True, stable=True).indices
    top1 = (order[:, 0] == labels).float().mean().item()
    top5 = (order[:, :5] == labels[:, None]).any(1).float().mean().item()
    return {'acc1': 100 * top1, 'acc5': 100 * top5}


def labels_of(dataset: Dataset) -> torch.Tensor:
    """The dataset's labels in order, without reading its images."""
    if isinstance(dataset, torch.utils.data.Subset):
        return labels_of(dataset.dataset)[torch.as_tensor(dataset.indices)]
    return torch.tensor([label for _, label in dataset.samples])


def knn_evaluate(encode: Callable[[torch.Tensor], torch.Tensor], train_set: Dataset, val_set: Dataset,
                 num_classes: int, k: int, temperature: float, batch_size: int, num_workers: int,
                 device: torch.device, precision: str) -> dict:
    """k-NN top-1/top-5 (%) of `encode`'s features (images -> [B, D]) of val_set against train_set."""
    train, train_ok = extract(encode, train_set, batch_size, num_workers, device, precision)
    val, val_ok = extract(encode, val_set, batch_size, num_workers, device, precision)
    votes = knn_votes(train[train_ok], labels_of(train_set).to(device)[train_ok], val[val_ok], num_classes, k,
                      temperature)
    return top_k_accuracy(votes, labels_of(val_set).to(device)[val_ok])  # unreadable images left out


def knn_sets(data_path: str, input_size: int, train_subset: int, val_subset: int) -> tuple:
    """(train/'s images, val/'s images, the number of classes) of --data_path at evaluation geometry, each spread
    over `*_subset` images (0: all): what main_knn.py and main_pretrain's monitor evaluate."""
    train = image_folder(data_path, 'train', eval_transform(input_size))
    val = image_folder(data_path, 'val', eval_transform(input_size))
    return spread_subset(train, train_subset), spread_subset(val, val_subset), len(train.classes)


def spread_subset(dataset: Dataset, count: int) -> Dataset:
    """`count` images spread evenly over the dataset (all of them when it has fewer): every class of a
    class-sorted folder is in it, and the same images every time."""
    if count <= 0 or count >= len(dataset):
        return dataset
    step = len(dataset) / count
    return torch.utils.data.Subset(dataset, [int(i * step) for i in range(count)])
