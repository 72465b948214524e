"""Launched by tests/test_distributed.py with torchrun (2 processes, gloo): records what each rank sees
of the repository's distributed data pipeline and checks a DDP step, one JSON per rank.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_probe.py DATA OUT_DIR

Through the repository's own code: `util.distributed.init_distributed`, `util.data.image_folder` /
`pretrain_transform` / `train_loader`, `models_milan.create_model`, `models_clip.build_random_teacher`.
The test makes the assertions; this script only measures (so a failed check shows both ranks' data).
"""
import argparse
import contextlib
import copy
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import models_milan  # noqa: E402
from util import distributed as udist  # noqa: E402
from models_clip import build_random_teacher  # noqa: E402
from util.data import BadImages, image_folder, pretrain_transform, to_device_normalized, train_loader  # noqa: E402

INPUT_SIZE = 32
BATCH_SIZE = 8
EPOCHS = 2
SEED = 0
ACCUM = 2


def gather(tensor):
    """all_gather of a tensor -> one tensor per rank (rank order)."""
    tensor = tensor.detach().contiguous()
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor)
    return out


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def flat_grads(model):
    return torch.cat([p.grad.detach().reshape(-1) for p in model.parameters()])


def checksum(vec):
    """Order-sensitive float64 fingerprint: plain sum plus a position-weighted sum."""
    v = vec.double()
    w = torch.arange(1, v.numel() + 1, dtype=torch.float64) / v.numel()
    return torch.stack([v.sum(), (v * w).sum()])


def gathered_checksums(vec):
    return [c.tolist() for c in gather(checksum(vec))]


def max_cross_rank_diff(vec):
    """Largest element-wise difference between any rank's vector and rank 0's."""
    vecs = gather(vec)
    return max(float((v - vecs[0]).abs().max()) for v in vecs)


def data_probe(args, data):
    dataset = image_folder(data, 'train', pretrain_transform(INPUT_SIZE))
    loader = train_loader(dataset, BATCH_SIZE, num_workers=0, pin_memory=False, seed=SEED)
    record = {'dataset_len': len(dataset), 'targets': [label for _, label in dataset.samples],
              'len_sampler': len(loader.sampler),
              'len_loader': len(loader), 'sampler_num_replicas': loader.sampler.shard.num_replicas,
              'sampler_rank': loader.sampler.shard.rank, 'sampler_seed': loader.sampler.shard.seed, 'epochs': []}
    first_batches = None
    for epoch in range(EPOCHS):
        loader.sampler.set_epoch(epoch)
        assert all(e == epoch for _, e in loader.sampler)  # keys carry the epoch that seeds augmentation
        sampler_indices = [int(i) for i, _ in loader.sampler]
        batches = [[int(i) for i, _ in b] for b in loader.batch_sampler]
        labels, shapes, images = [], [], []
        for imgs, lbls, _ in loader:  # the images themselves, in the same order
            labels.append(lbls.tolist())
            shapes.append(list(imgs.shape))
            assert imgs.dtype == torch.uint8, imgs.dtype
            images.append(imgs)
        record['epochs'].append({'epoch': epoch, 'sampler_indices': sampler_indices, 'batches': batches,
                                 'labels': labels, 'shapes': shapes,
                                 'image_checksums': [float(i.double().sum()) for i in images]})
        if first_batches is None:
            first_batches = images[:ACCUM]
    return record, first_batches


def ddp_probe(first_batches, device):
    """DDP on a tiny pixel-target model: init broadcast, no_sync accumulation over ACCUM rank-local
    micro-batches, one AdamW step; compared with a plain model's locally accumulated, all-reduced grads."""
    rank = dist.get_rank()
    torch.manual_seed(1234 + rank)  # deliberately different initial weights per rank
    model = models_milan.create_model('mae_vit_tiny_patch8', img_size=INPUT_SIZE, target='pixel').to(device)
    out = {'checksums_before_ddp': gathered_checksums(flat_params(model))}

    ddp = DistributedDataParallel(model)  # broadcasts rank 0's parameters
    out['checksums_after_init'] = gathered_checksums(flat_params(model))
    out['max_diff_after_init'] = max_cross_rank_diff(flat_params(model))
    reference = copy.deepcopy(model)  # plain module, same weights as the DDP one now
    start = flat_params(model).clone()

    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    optimizer.zero_grad(set_to_none=True)
    losses = []
    for k, images in enumerate(first_batches):
        x = to_device_normalized(images, device)
        torch.manual_seed(100 * rank + k)  # the random mask, replayed below for the reference
        update = k + 1 == len(first_batches)
        with contextlib.nullcontext() if update else ddp.no_sync():
            loss, _, _ = ddp(x, None, None, 0.75)
            (loss / len(first_batches)).backward()
        losses.append(float(loss.detach()))
        if not update:  # gradients after a no_sync micro-step are still rank-local
            out['grad_checksums_after_no_sync'] = gathered_checksums(flat_grads(model))
    ddp_grads = flat_grads(model)
    out['grad_checksums_after_sync'] = gathered_checksums(ddp_grads)

    for k, images in enumerate(first_batches):
        x = to_device_normalized(images, device)
        torch.manual_seed(100 * rank + k)
        loss, _, _ = reference(x, None, None, 0.75)
        (loss / len(first_batches)).backward()
    ref_grads = flat_grads(reference)
    dist.all_reduce(ref_grads)
    ref_grads /= dist.get_world_size()
    out['grad_max_abs_err_vs_reference'] = float((ddp_grads - ref_grads).abs().max())
    out['grad_max_abs'] = float(ref_grads.abs().max())

    optimizer.step()
    after = flat_params(model)
    out['losses'] = [[float(v) for v in t] for t in gather(torch.tensor(losses, dtype=torch.float64))]
    out['param_change'] = float((after - start).abs().max())
    out['checksums_after_step'] = gathered_checksums(after)
    out['max_diff_after_step'] = max_cross_rank_diff(after)
    return out


def bad_images_probe(rank):
    """BadImages' totals after three checks, as the shuffle hands the same bad files to different ranks:
    check 1: rank 0 met a.jpg, rank 1 met a.jpg and b.jpg; check 2: nothing new; check 3: rank 0 met b.jpg."""
    bad = BadImages(dataset_size=100, max_frac=0.5)
    met = [['a.jpg'], ['a.jpg', 'b.jpg']][rank]
    totals = []
    for paths in (met, [], ['b.jpg'] if rank == 0 else []):
        bad.add(paths)
        totals.append(bad.check())
    return totals


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('data')
    parser.add_argument('out_dir')
    cli = parser.parse_args()

    args = argparse.Namespace(device='cpu', dist_url='env://', local_rank=0)
    device = udist.init_distributed(args)
    torch.set_num_threads(1)
    record = {'rank': args.rank, 'world_size': args.world_size, 'local_rank': args.local_rank,
              'distributed': args.distributed, 'device': str(device), 'backend': dist.get_backend(),
              'util_rank': udist.rank(), 'util_world_size': udist.world_size(), 'is_main': udist.is_main()}

    data_record, first_batches = data_probe(args, cli.data)
    record.update(data_record)
    record['ddp'] = ddp_probe(first_batches, device)

    teacher = build_random_teacher(8, INPUT_SIZE // 8)  # the --clip_model random teacher must agree across ranks
    record['teacher_max_diff'] = max_cross_rank_diff(flat_params(teacher))

    record['bad_image_totals'] = bad_images_probe(args.rank)

    os.makedirs(cli.out_dir, exist_ok=True)
    path = os.path.join(cli.out_dir, f'rank{args.rank}.json')
    with open(path + '.tmp', 'w') as f:
        json.dump(record, f)
    os.replace(path + '.tmp', path)
    dist.barrier()
    udist.cleanup()


if __name__ == '__main__':
    main()
