"""The default GPU run, checked in one short job before a long run depends on it: does the compiled bf16 step
compute what the eager fp32 step computes, do nvJPEG decoding, the TensorBoard panels and DDP work, and how
fast are the step, the MAE baseline, fine-tuning and the two input pipelines. Under 8 minutes on one H100/H200,
cold caches and compilation included; only packages a GPU image has.

    python benchmarks/gpu_check.py OUT_DIR          # on a GPU: ViT-B/16 sizes
    python benchmarks/gpu_check.py OUT_DIR --toy    # tiny sizes on the CPU, the same code path (CI)

Writes OUT_DIR/gpu_check.md (also printed as it goes): the run header, then
- correctness, each PASS or FAIL with the measured number and its tolerance:
  - one MILAN step (--use_clip --change_decoder --attn_mask) with per-block torch.compile under bf16 autocast
    against the eager fp32 step, same weights, batch and masks: the loss, and the direction and size of the
    flattened gradient;
  - --gpu_decode's decoding on the device (nvJPEG) against the same function on the CPU, same encoded batch;
  - visualize.panels on a model whose blocks are compiled, after a compiled training step;
  - one training step under DDP (a one-process group: nccl, gloo on the CPU) against the same step without;
- speed (bench_pretrain / bench_finetune's measurements): the MILAN step, the MAE baseline (--norm_pix_loss)
  and fine-tuning, bf16 and compiled; the loader with CPU workers and with --gpu_decode.
Without a GPU (or with --toy) every section runs at toy size on the CPU, compiled (Inductor's CPU backend)
and under bf16 autocast. Each section starts from a fresh compiler state, as a new training process does.
The exit code is 1 when a correctness row does not pass. --budget bounds the whole run: the section running
when it is spent is stopped and the rest are skipped, so the table is complete in any case.
"""
import argparse
import contextlib
import dataclasses
import io
import itertools
import os
import signal
import sys
import tempfile
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torchvision.io import ImageReadMode, decode_jpeg

import bench_finetune
import bench_pretrain
import common  # puts the repository on sys.path
import visualize
from engine_pretrain import pretrain_loss
from models_milan import masking_order
from util.device_decode import decode_on_device
from util.precision import autocast

START = time.monotonic()  # the budget and the reported wall time count from here, after the imports

# bf16 keeps 8 significant bits: rounding each product to them moves a step through some thirty blocks by well
# under these; a wrong kernel, a graph that drops an op or a mis-cast tensor moves it by far more.
LOSS_RTOL = 1e-2
GRAD_COSINE = 0.99
GRAD_NORM_RTOL = 5e-2
# torchvision's own bound for nvJPEG against libjpeg, mean absolute difference in uint8 levels
DECODE_LEVELS = 2.0
# One process: DDP should change nothing. The first AdamW step is about lr x sign(gradient), so gradient noise
# (flash attention's non-deterministic backward, DDP's graphs split at its buckets) flips the update of the
# weights whose gradients are near zero: compare directions, which a graph that drops or mis-casts an op moves
# far more.
DDP_COSINE = 0.999


@dataclasses.dataclass(frozen=True)
class Size:
    """What each section runs at."""
    model: str
    finetune_model: str
    input_size: int
    teacher: str  # bench_pretrain.TEACHERS
    batch: int
    finetune_batch: int
    steps: int  # timed steps of a speed row, after `warmup` untimed ones
    warmup: int
    workers: int
    loader_steps: int  # batches; the warm-up lets every worker deliver its first batch
    loader_warmup: int
    jpegs: int  # distinct generated files (the loader's others are hard links to them)
    decode_batch: int


GPU = Size('mae_vit_base_patch16', 'vit_base_patch16', 224, 'vit_b16', 256, 128, steps=20, warmup=5, workers=16,
           loader_steps=48, loader_warmup=16, jpegs=256, decode_batch=32)
TOY = Size('mae_vit_tiny_patch8', 'vit_tiny_patch8', 32, 'tiny', 8, 8, steps=3, warmup=1, workers=2,
           loader_steps=4, loader_warmup=2, jpegs=16, decode_batch=8)


def pretrain_opts(size, device, *flags, steps=None, warmup=None):
    """bench_pretrain's options at this size, plus `flags`."""
    return bench_pretrain.get_args_parser().parse_args([
        '--device', device.type, '--input_size', str(size.input_size), '--teacher', size.teacher,
        '--num_workers', str(size.workers), '--steps', str(steps or size.steps), '--warmup', str(warmup or size.warmup),
        *flags])


def flat_gradient(model):
    return torch.cat([p.grad.flatten().double() for p in model.parameters() if p.requires_grad])


def flat_parameters(model):
    return torch.cat([p.detach().flatten().double() for p in model.parameters() if p.requires_grad])


class FixedMasks:
    """The masking order drawn once, from the first step's teacher importance as training draws it, then reused:
    builds whose teachers differ in rounding still mask the same patches."""

    def __init__(self):
        self.ids = None

    def student(self, model):
        """`model` with these masks, called as engine_pretrain.pretrain_loss calls the student."""
        def forward(images, targets, importance, mask_ratio):
            if self.ids is None:
                self.ids = masking_order(len(images), model.num_patches, images.device, importance)
            return model(images, targets, importance, mask_ratio, ids_shuffle=self.ids)
        return forward


def compiled_vs_eager(size, device, folder):
    """The compiled bf16 step against the eager fp32 one: same initial weights, batch and masks."""
    opts = pretrain_opts(size, device)
    images = bench_pretrain.synthetic_batch(opts, size.batch, device)[0]
    masks, results = FixedMasks(), []
    for precision, compiled in (('fp32', False), ('bf16', True)):
        args = bench_pretrain.run_args(opts, size.model, size.batch, precision, compiled)
        torch.manual_seed(0)
        model, teacher = common.quiet(bench_pretrain.build_models, opts, args, device)
        with autocast(args.precision, device):
            loss = pretrain_loss(masks.student(model), teacher, images, args, device)
        loss.backward()
        results.append((loss.item(), flat_gradient(model)))
        del model, teacher, loss
    (loss, grad), (fast_loss, fast_grad) = results
    loss_error = abs(fast_loss - loss) / abs(loss)
    cosine = (torch.dot(fast_grad, grad) / (fast_grad.norm() * grad.norm())).item()
    norm_error = abs(fast_grad.norm() - grad.norm()).item() / grad.norm().item()
    name = 'compiled bf16 step vs eager fp32'
    return [(f'{name}: loss', f'rel. error {loss_error:.1e}', f'<= {LOSS_RTOL:g}', loss_error <= LOSS_RTOL),
            (f'{name}: gradient direction', f'cosine {cosine:.5f}', f'>= {GRAD_COSINE:g}', cosine >= GRAD_COSINE),
            (f'{name}: gradient norm', f'rel. error {norm_error:.1e}', f'<= {GRAD_NORM_RTOL:g}',
             norm_error <= GRAD_NORM_RTOL)]


def device_decoding(size, device, folder):
    """--gpu_decode's decoding and resizing on the device against the same function on the CPU."""
    opts = pretrain_opts(size, device, '--gpu_decode', '--num_workers', '0')
    encoded = next(common.endless(bench_pretrain.jpeg_loader(opts, folder, size.decode_batch, device)))[0]
    if device.type == 'cuda':  # nvJPEG itself must decode the batch: decode_on_device would fall back to PIL
        decode_jpeg(encoded.data, mode=ImageReadMode.RGB, device=device)
    on_device = decode_on_device(encoded, device, size.input_size)[0].cpu().float()
    on_cpu = decode_on_device(encoded, torch.device('cpu'), size.input_size)[0].float()
    levels = (on_device - on_cpu).abs().mean().item()
    decoder = 'nvJPEG' if device.type == 'cuda' else 'device path'
    return [(f'--gpu_decode ({decoder}, {device.type}) vs the same on cpu, {len(on_cpu)} JPEGs',
             f'mean abs. diff. {levels:.2f} levels', f'<= {DECODE_LEVELS:g}', levels <= DECODE_LEVELS)]


def panels_on_compiled_blocks(size, device, folder):
    """visualize.panels, as main_pretrain calls it between epochs, on blocks that compiled training steps ran."""
    opts = pretrain_opts(size, device)
    args = bench_pretrain.run_args(opts, size.model, size.batch, 'bf16', True)
    model, teacher = common.quiet(bench_pretrain.build_models, opts, args, device)
    batch = bench_pretrain.synthetic_batch(opts, size.batch, device)
    run_epoch = common.quiet(bench_pretrain.epoch_runner, args, device, model, teacher)
    common.quiet(run_epoch, common.Batches(itertools.repeat(batch), 1))
    count = min(4, size.batch)
    grids = visualize.panels(model, teacher, batch[0][:count], args.mask_ratio, attn_mask=True).grids
    side = size.input_size
    expected = (count, *visualize.grid_shape(side))
    return [('visualize.panels on compiled blocks', f'{grids.dtype} {list(grids.shape)}',
             f'uint8 {list(expected)}', grids.shape == expected and grids.dtype == np.uint8)]


def step_update(opts, size, device, batch, distributed):
    """How one compiled bf16 training step moves the weights, the model wrapped for DDP or not. The blocks
    compile afresh: inside DDP's forward, Dynamo compiles them its own way (DDPOptimizer splits each graph
    at the gradient buckets), and a multi-GPU run uses those graphs."""
    args = bench_pretrain.run_args(opts, size.model, size.batch, 'bf16', True)
    args.warmup_epochs, args.distributed = 0, distributed  # the first step at the full lr, so that it moves
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, teacher = common.quiet(bench_pretrain.build_models, opts, args, device)
    before = flat_parameters(model)
    run_epoch = common.quiet(bench_pretrain.epoch_runner, args, device, model, teacher)
    torch.manual_seed(1)  # the same masks
    common.quiet(run_epoch, common.Batches(itertools.repeat(batch), 1))
    return flat_parameters(model) - before


def ddp_step(size, device, folder):
    """One step under DDP in a one-process group, against the same step without DDP."""
    opts = pretrain_opts(size, device)
    batch = bench_pretrain.synthetic_batch(opts, size.batch, device)
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    with tempfile.TemporaryDirectory(prefix='gpu_check_') as tmp:
        dist.init_process_group(backend, init_method='file://' + os.path.join(tmp, 'store'), world_size=1, rank=0,
                                **({'device_id': device} if device.type == 'cuda' else {}))
        try:
            plain, wrapped = [step_update(opts, size, device, batch, ddp) for ddp in (False, True)]
        finally:
            dist.destroy_process_group()
    cosine = torch.nn.functional.cosine_similarity(wrapped, plain, dim=0).item()
    return [(f'one DDP step ({backend}, 1 process) vs without DDP', f'update cosine {cosine:.5f}',
             f'>= {DDP_COSINE:g}', cosine >= DDP_COSINE)]


def step_speed(run_epoch, batch, flops, opts, device):
    """batch, images/s, ms/step, peak GiB, GFLOP/image and MFU of `run_epoch` fed `batch` over and over."""
    seconds, peak_gib = common.time_steps(run_epoch, itertools.repeat(batch), opts, device)
    size = len(batch[0])
    return size, *common.step_row(size, seconds, peak_gib, flops, common.peak_tflops(opts, device))


def pretrain_speed(mode):
    def measure(size, device, folder):
        opts = pretrain_opts(size, device, '--mode', mode)
        flops = bench_pretrain.count_flops(opts, size.model, device)
        args = bench_pretrain.run_args(opts, size.model, size.batch, 'bf16', True)
        return step_speed(common.quiet(bench_pretrain.build, opts, args, device),
                          bench_pretrain.synthetic_batch(opts, size.batch, device), flops, opts, device)
    return measure


def finetune_speed(size, device, folder):
    opts = bench_finetune.get_args_parser().parse_args([
        '--device', device.type, '--input_size', str(size.input_size), '--steps', str(size.steps), '--warmup',
        str(size.warmup)])
    flops = bench_finetune.count_flops(opts, size.finetune_model, device)
    args = bench_finetune.run_args(opts, size.finetune_model, size.finetune_batch, 'bf16', True)
    return step_speed(common.quiet(bench_finetune.build, args, device),
                      bench_finetune.synthetic_batch(opts, size.finetune_batch, device), flops, opts, device)


def loader_speed(gpu_decode):
    def measure(size, device, folder):
        opts = pretrain_opts(size, device, *(['--gpu_decode'] if gpu_decode else []), steps=size.loader_steps,
                             warmup=size.loader_warmup)
        loader = bench_pretrain.jpeg_loader(opts, folder, size.batch, device)
        return size.batch, f'{bench_pretrain.loader_speed(opts, device, loader):,.0f}', '-', '-', '-', '-'
    return measure


def sections(size, device):
    """(correctness sections, speed sections) as (name, function(size, device, jpeg folder)), most telling
    first: when the budget runs out, what is left is skipped."""
    workers = f'{size.workers} CPU workers'
    correctness = [('compiled bf16 step vs eager fp32', compiled_vs_eager), ('device decoding', device_decoding),
                   ('visualize.panels on compiled blocks', panels_on_compiled_blocks),
                   ('one DDP step vs without DDP', ddp_step)]
    speed = [(f'MILAN {size.model}, bf16, compiled', pretrain_speed('milan')),
             (f'MAE baseline {size.model}, bf16, compiled', pretrain_speed('mae')),
             (f'loader, {workers}', loader_speed(False)),
             (f'loader, {workers} reading, --gpu_decode on {device.type}', loader_speed(True)),
             (f'fine-tuning {size.finetune_model}, bf16, compiled', finetune_speed)]
    return correctness, speed


class OutOfTime(BaseException):
    """The budget is spent. A BaseException, so that no `except Exception` on the way catches it."""


@contextlib.contextmanager
def deadline(at):
    """Raise OutOfTime in the main thread once time.monotonic() reaches `at` (loader workers and compile
    processes do not inherit the timer)."""
    def alarm(signum, frame):
        raise OutOfTime

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, max(at - time.monotonic(), 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Outcome(NamedTuple):
    rows: list  # None unless the section finished
    note: str  # why it did not: its error, or the budget
    ran: bool  # False when the budget stopped or skipped it
    seconds: float


def run_section(fn, size, device, folder, end):
    """One section, from a fresh compiler state and seed; its models and loaders are released after it."""
    start = time.monotonic()
    if start >= end:
        return Outcome(None, 'skipped: budget spent', False, 0.0)
    torch._dynamo.reset()
    torch.manual_seed(0)
    try:
        with deadline(end):
            return Outcome(fn(size, device, folder), '', True, time.monotonic() - start)
    except OutOfTime:
        return Outcome(None, 'stopped: budget spent', False, time.monotonic() - start)
    except Exception as e:  # reported in the table; the remaining sections still run
        text = ' '.join(f'{type(e).__name__}: {e}'.split()).replace('|', '/')
        return Outcome(None, text[:200], True, time.monotonic() - start)
    finally:
        common.release(device)


class Tee(io.TextIOBase):
    """stdout that also goes to the table file, so the file holds what was printed even if the job is killed."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)


def check(size, device, end, folder):
    """Run every section, print both tables; returns the number of correctness rows that did not pass (failed,
    or not run for lack of time)."""
    correctness, speed = sections(size, device)
    print('\n## Correctness\n')
    table = common.Table('check', 'result', 'measured', 'tolerance', 'wall s')
    failed = 0
    for name, fn in correctness:
        outcome = run_section(fn, size, device, folder, end)
        for check_name, measured, tolerance, passed in outcome.rows or [(name, outcome.note, '-', False)]:
            result = 'PASS' if passed else 'FAIL' if outcome.ran else 'NOT RUN'
            table.row(check_name, result, measured, tolerance, f'{outcome.seconds:.1f}')
            failed += not passed
    print('\n## Speed\n')
    table = common.Table('setting', 'batch', 'images/s', 'ms/step', 'peak GiB', 'GFLOP/image', 'MFU', 'wall s')
    for name, fn in speed:
        outcome = run_section(fn, size, device, folder, end)
        table.row(name, *(outcome.rows or ['-', outcome.note, '-', '-', '-', '-']), f'{outcome.seconds:.1f}')
    return failed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('out_dir', help='where gpu_check.md is written')
    parser.add_argument('--toy', action='store_true', help='toy sizes on the CPU even where there is a GPU')
    parser.add_argument('--budget', type=float, default=420,
                        help='seconds from start after which the running section is stopped and the rest skipped')
    opts = parser.parse_args()
    device = torch.device('cuda', 0) if torch.cuda.is_available() and not opts.toy else torch.device('cpu')
    size = GPU if device.type == 'cuda' else TOY
    os.makedirs(opts.out_dir, exist_ok=True)
    path = os.path.join(opts.out_dir, 'gpu_check.md')
    with open(path, 'w') as out, contextlib.redirect_stdout(Tee(sys.stdout, out)), \
            tempfile.TemporaryDirectory(prefix='gpu_check_jpegs_') as folder:
        common.print_header(device)
        print(f'# {"GPU" if size is GPU else "toy"} sizes: {size.model} (random-weight CLIP teacher, --teacher '
              f'{size.teacher}) and {size.finetune_model} at {size.input_size} px, batch {size.batch} (fine-tuning '
              f'{size.finetune_batch}); budget {opts.budget:g} s')
        count = (size.loader_warmup + size.loader_steps + size.workers) * size.batch
        common.generate_jpegs(folder, count, distinct=size.jpegs)
        print(f'# {count} JPEGs ({size.jpegs} distinct, the others hard links) generated in '
              f'{time.monotonic() - START:.1f} s from start')
        failed = check(size, device, START + opts.budget, folder)
        print(f'\n{"all correctness checks pass" if not failed else f"{failed} correctness row(s) did not pass"}; '
              f'wall time {time.monotonic() - START:.1f} s; table in {path}')
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
