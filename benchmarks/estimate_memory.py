"""Peak memory of a pretraining step without a GPU: the real models, optimizer and loss run on fake tensors
(shapes and dtypes only, nothing computed or allocated), and every tensor storage is counted from its
creation to its release; so a batch size can be checked against a GPU's memory in seconds, on any machine.

    python benchmarks/estimate_memory.py --models mae_vit_base_patch16 mae_vit_large_patch16 --batch_sizes 128 256

What it counts: parameters, gradients, AdamW state, the batch, the teacher's outputs and every activation
autograd keeps, in eager mode under bf16 autocast (the CPU's autocast, whose casting rules match CUDA's for
these layers; fused attention keeps no attention matrix on either). What it does not: the CUDA allocator's
rounding and caching, cuBLAS workspaces and the CUDA context, and torch.compile (whose fusion usually keeps
fewer activations), so read it as the eager step's need, not nvidia-smi's figure.
"""
import argparse
import itertools
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import common
import main_pretrain
import models_milan
from bench_pretrain import MODES, TEACHERS, random_teacher, run_args
from engine_pretrain import pretrain_loss
from util import data
from util.precision import autocast


class StorageBytes(TorchDispatchMode):
    """Bytes held by live tensor storages, and their peak, as every operation creates them and as they are
    released (a weak reference per storage)."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = set(), 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage):
        key = storage._cdata
        if key in self.live:
            return
        self.live.add(key)
        self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._release, key, storage.nbytes())

    def _release(self, key, nbytes):
        self.live.discard(key)
        self.now -= nbytes


def two_steps(opts, args):
    """Build the teacher, student and AdamW as main_pretrain does and take two training steps as the engine
    does (the second with the optimizer's state); returns what a run keeps between steps."""
    teacher = random_teacher(opts, args)
    model = main_pretrain.build_model(args, teacher).train()
    optimizer = main_pretrain.build_optimizer(args, model)
    device = torch.device('cpu')
    for _ in range(2):
        images = torch.randint(0, 256, (args.batch_size, 3, args.input_size, args.input_size), dtype=torch.uint8)
        with autocast(args.precision, device):
            loss = pretrain_loss(model, teacher, images, args, device)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, teacher, optimizer


def estimate(opts, model_name, batch_size, fake):
    """(GiB kept between steps: weights and AdamW state, peak GiB over two training steps)."""
    args = run_args(opts, model_name, batch_size, opts.precision, False)
    counter = StorageBytes()
    try:
        with fake, counter:
            kept = two_steps(opts, args)
            resident = counter.now
            del kept
    finally:  # util.data caches its normalisation constants per device: drop the fake ones made here
        data._channels.cache_clear()
    return resident / 2 ** 30, counter.peak / 2 ** 30


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['mae_vit_base_patch16'], choices=sorted(models_milan.MODELS))
    parser.add_argument('--batch_sizes', nargs='+', type=int, default=[256])
    parser.add_argument('--mode', default='milan', choices=sorted(MODES))
    parser.add_argument('--precision', default='bf16', choices=['bf16', 'fp32'])
    parser.add_argument('--input_size', type=int, default=224)
    parser.add_argument('--teacher', default='vit_b16', choices=sorted(TEACHERS))
    opts = parser.parse_args()
    opts.device = 'cpu'
    common.print_header(torch.device('cpu'))
    table = common.Table('mode', 'model', 'batch', 'precision', 'weights + AdamW GiB', 'estimated peak GiB')
    fake = FakeTensorMode(allow_non_fake_inputs=True)  # util.data caches its normalisation constants
    for model_name, batch_size in itertools.product(opts.models, opts.batch_sizes):
        resident, peak = estimate(opts, model_name, batch_size, fake)
        table.row(opts.mode, model_name, batch_size, opts.precision, f'{resident:.2f}', f'{peak:.2f}')


if __name__ == '__main__':
    main()
