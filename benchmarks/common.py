"""What the benchmark scripts share: their common options, the run header (device, versions, date, command),
counted FLOPs (attention included), the timing loop over the real training epoch, ImageNet-like JPEGs and the
markdown table."""
import argparse
import contextlib
import datetime
import gc
import io
import itertools
import os
import platform
import sys
import tempfile
import time

import numpy as np
import timm
import torch
import torchvision
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# bf16 dense matrix-product rates measured on this project's machines, TFLOP/s
PEAK_TFLOPS = {'H100': 760, 'H200': 790}


def add_common_args(parser, model_choices, default_model, default_batch):
    parser.add_argument('--models', nargs='+', default=[default_model], choices=sorted(model_choices))
    parser.add_argument('--batch_sizes', nargs='+', type=int, default=[default_batch])
    parser.add_argument('--precisions', nargs='+', default=['bf16'], choices=['bf16', 'fp16', 'fp32'])
    parser.add_argument('--compile', nargs='+', default=['on'], choices=['on', 'off'])
    parser.add_argument('--input_size', type=int, default=224)
    parser.add_argument('--steps', type=int, default=20, help='timed steps per setting')
    parser.add_argument('--warmup', type=int, default=5, help='untimed steps first (compilation, allocator)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--peak_tflops', type=float, default=None,
                        help='the device\'s bf16 matrix rate for utilisation (default: known H100/H200 values)')
    parser.add_argument('--data', default='synthetic', choices=['synthetic', 'jpeg'],
                        help='synthetic: one batch already on the device; jpeg: the real loader over a folder '
                             'of JPEGs (--data_path, or --generate ImageNet-like ones)')
    parser.add_argument('--data_path', default=None, help='an image folder holding train/<class>/<images>')
    parser.add_argument('--generate', type=int, default=2000, help='JPEGs to generate when --data_path is not given')
    parser.add_argument('--num_workers', type=int, default=16)


def device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    model = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name')),
                 platform.processor()) if os.path.exists('/proc/cpuinfo') else platform.processor()
    return f'CPU {model}, {os.cpu_count()} cores'


def print_header(device):
    """Everything needed to read and reproduce the table that follows."""
    cuda = f' (CUDA {torch.version.cuda})' if device.type == 'cuda' else ''
    print(f'# {device_name(device)}; torch {torch.__version__}{cuda}; torchvision {torchvision.__version__}; '
          f'timm {timm.__version__}; {datetime.date.today()}')
    print(f'# python {os.path.relpath(sys.argv[0], ROOT)} {" ".join(sys.argv[1:])}', flush=True)


def peak_tflops(opts, device):
    if opts.peak_tflops or device.type != 'cuda':
        return opts.peak_tflops
    return next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name(device)), None)


class Table:
    """A markdown table printed row by row, so a long run shows its results as they come."""

    def __init__(self, *columns):
        print('| ' + ' | '.join(columns) + ' |\n|' + ' --- |' * len(columns), flush=True)

    @staticmethod
    def row(*cells):
        print('| ' + ' | '.join(str(c) for c in cells) + ' |', flush=True)


class Batches:
    """`count` batches taken from the iterator `source`, quacking like util.data.train_loader for the training
    epoch (which reads only `sampler.batches_per_epoch`)."""

    def __init__(self, source, count):
        self.source, self.sampler = source, argparse.Namespace(batches_per_epoch=count)

    def __iter__(self):
        return itertools.islice(self.source, self.sampler.batches_per_epoch)


def endless(loader):
    """A real training loader's batches, epoch after epoch."""
    for epoch in itertools.count():
        loader.sampler.set_epoch(epoch)
        yield from loader


def quiet(fn, *args):
    """Run without the training loop's log lines, so the table stays readable."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def release(device):
    """Free what the previous setting left (model, optimizer, loader workers, cached GPU blocks), so that
    settings do not share memory or cores."""
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's counter knows the CUDA attention kernels only; the CPU's fused kernel would count 0. These give it
# torch's own count for the CUDA kernels: 4 B H Nq Nk D forward, 2.5 times that backward.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def flop_counter():
    """torch.utils.flop_counter's mode, counting attention on the CPU as on the GPU."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)


def flops_per_image(run_epoch, batch):
    """Matrix-product and attention FLOPs of one training step (forward and backward) on `batch`, counted by
    torch.utils.flop_counter; run it on an eager fp32 build so every product is seen."""
    counter = flop_counter()
    with counter:
        quiet(run_epoch, Batches(itertools.repeat(batch), 1))
    return counter.get_total_flops() / len(batch[0])


def time_steps(run_epoch, source, opts, device):
    """(seconds per step, peak GiB allocated on a GPU, else None) of `run_epoch` over --steps batches of `source`,
    after --warmup untimed ones."""
    quiet(run_epoch, Batches(source, opts.warmup))
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    quiet(run_epoch, Batches(source, opts.steps))
    synchronize(device)
    seconds = (time.perf_counter() - start) / opts.steps
    return seconds, torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else None


def step_row(batch_size, seconds, peak_gib, flops, peak):
    """images/s, ms/step, peak GiB, GFLOP/image, MFU cells."""
    speed = batch_size / seconds
    mfu = f'{100 * flops * speed / (peak * 1e12):.1f}%' if peak else '-'
    memory = '-' if peak_gib is None else f'{peak_gib:.1f}'
    return f'{speed:,.1f}', f'{1000 * seconds:.1f}', memory, f'{flops / 1e9:.4g}', mfu


def generate_jpegs(folder, count, seed=0, distinct=None):
    """ImageNet-like files under folder/train/n0: about 500x375 and 100+ KB each (smooth colour fields plus
    noise), so decoding costs what ImageNet's does. With `distinct`, only that many are drawn and the others
    are hard links to them: decoding costs the same, and drawing them is the slow part."""
    rng = np.random.default_rng(seed)
    images = os.path.join(folder, 'train', 'n0')
    os.makedirs(images, exist_ok=True)
    distinct = count if distinct is None else min(distinct, count)
    for i in range(distinct):
        w, h = int(rng.integers(400, 560)), int(rng.integers(300, 420))
        base = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC), dtype=np.float32)
        img += rng.normal(0, 20, img.shape)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(os.path.join(images, f'{i:06d}.JPEG'), quality=90)
    for i in range(distinct, count):
        os.link(os.path.join(images, f'{i % distinct:06d}.JPEG'), os.path.join(images, f'{i:06d}.JPEG'))
    return folder


@contextlib.contextmanager
def jpeg_folder(opts):
    """--data_path, or a temporary folder of --generate ImageNet-like JPEGs."""
    if opts.data_path:
        yield opts.data_path
        return
    with tempfile.TemporaryDirectory(prefix='milan_jpegs_') as tmp:
        yield generate_jpegs(tmp, opts.generate)


if __name__ == '__main__':
    if len(sys.argv) != 3:
        sys.exit('usage: python benchmarks/common.py FOLDER COUNT  (writes COUNT ImageNet-like JPEGs to FOLDER/train)')
    generate_jpegs(sys.argv[1], int(sys.argv[2]))
