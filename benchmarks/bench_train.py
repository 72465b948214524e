"""Training speed: images/s, ms per step, peak memory and model-FLOP utilisation of the real training step
(engine_pretrain.train_one_epoch: teacher, masking, student, backward, fused AdamW; or, with --mode
finetune, engine_finetune's) on synthetic batches already on the device; and, with --loader, the input
pipeline alone on a folder of JPEGs.

    python benchmarks/bench_train.py --models mae_vit_base_patch16 --batch_sizes 256 --compile on off
    python benchmarks/bench_train.py --mode mae --models mae_vit_base_patch16 --batch_sizes 256
    python benchmarks/bench_train.py --mode finetune --models mae_vit_base_patch16 --batch_sizes 128
    python benchmarks/bench_train.py --loader --generate 2000 --num_workers 16 --batch_sizes 256 [--gpu_decode]
    python benchmarks/bench_train.py --device cpu --models mae_vit_tiny_patch8 --input_size 64 \\
        --batch_sizes 8 --precisions fp32 --compile off --steps 2 --warmup 1 --teacher tiny  # CPU

FLOPs per image are counted (torch.utils.flop_counter on one eager step, matrix products only), not
assumed; utilisation divides achieved FLOP/s by --peak_tflops (default: 760 on an H100, 790 on an H200,
the bf16 matrix rates measured on this project's machines; none elsewhere).
"""
import argparse
import contextlib
import io
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from timm.loss import LabelSmoothingCrossEntropy
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import main_finetune  # noqa: E402
import main_pretrain  # noqa: E402
import models_milan  # noqa: E402
from engine_finetune import train_one_epoch as finetune_epoch  # noqa: E402
from engine_pretrain import train_one_epoch  # noqa: E402
from util import runtime  # noqa: E402
from util.clip_teacher import build_random_teacher  # noqa: E402
from util.data import image_folder, pretrain_transform, train_loader  # noqa: E402
from util.device_decode import decode_on_device  # noqa: E402
from util.logger import RunLogger  # noqa: E402
from util.optim import adamw, param_groups_weight_decay  # noqa: E402
from util.precision import grad_scaler  # noqa: E402

MODES = {  # flags of the entry point for each setting
    'milan': ['--use_clip', '--change_decoder', '--attn_mask'],
    'mae': ['--norm_pix_loss'],
    'finetune': ['--global_pool', '--drop_path', '0.1', '--layer_decay', '0.65'],
}
PEAK_TFLOPS = {'H100': 760, 'H200': 790}
# Random-weight teachers: the step's speed does not depend on the weights, and none need downloading.
TEACHERS = {'vit_b16': dict(width=768, layers=12, output_dim=512), 'tiny': dict(width=64, layers=2, output_dim=64)}


class SyntheticLoader:
    """The same (images, labels) batch, already on the device, `steps` times; quacks like
    util.data.train_loader."""

    def __init__(self, batch, steps):
        self.images, self.labels = batch
        self.sampler = argparse.Namespace(batches_per_epoch=steps)

    def __iter__(self):
        return ((self.images, self.labels, []) for _ in range(self.sampler.batches_per_epoch))


def run_args(opts, model_name, batch_size, precision, compile_):
    """The entry point's own flags and defaults for this setting (fine-tuning: the classifier of that size)."""
    script = main_finetune if opts.mode == 'finetune' else main_pretrain
    if opts.mode == 'finetune':
        model_name = model_name.replace('mae_', '')
    argv = ['--model', model_name, '--batch_size', str(batch_size), '--input_size', str(opts.input_size),
            '--precision', precision, '--device', opts.device,
            '--print_freq', '1000000', '--epochs', '1000', '--warmup_epochs', '1',
            '--compile' if compile_ else '--no-compile', *MODES[opts.mode]]
    args = script.get_args_parser().parse_args(argv)
    args.lr, args.distributed, args.rank, args.world_size = 1e-4, False, 0, 1
    return args


def build(args, device, opts):
    """(run one epoch over a loader with a scaler, the transformer blocks --compile compiles) for the mode:
    the pretraining step with its teacher, or fine-tuning (layer decay, drop path, label smoothing)."""
    logger = RunLogger(None, None)
    if opts.mode == 'finetune':
        model = main_finetune.build_model(args).to(device)
        optimizer = main_finetune.build_optimizer(args, model)
        criterion = LabelSmoothingCrossEntropy(args.smoothing)
        return (lambda loader, scaler: finetune_epoch(model, criterion, loader, optimizer, scaler, 0, args, device,
                                                      logger)), [model.blocks]
    patch = models_milan.MODELS[args.model]['patch_size']
    teacher = None
    if args.use_clip:
        teacher = build_random_teacher(patch, args.input_size // patch, **TEACHERS[opts.teacher]).to(device)
    model = models_milan.create_model(
        args.model, img_size=args.input_size, target='clip' if args.use_clip else 'pixel',
        target_dim=teacher.output_dim if teacher is not None else 512, prompting_decoder=args.change_decoder,
        norm_pix_loss=args.norm_pix_loss).to(device)
    optimizer = adamw(param_groups_weight_decay(model, args.weight_decay), args.lr, (0.9, 0.95), device)
    blocks = [model.blocks, model.decoder_blocks, teacher.transformer.resblocks if teacher is not None else []]
    return (lambda loader, scaler: train_one_epoch(model, teacher, loader, optimizer, scaler, 0, args, device,
                                                   logger)), blocks


def synthetic_batch(opts, batch_size, device):
    """uint8 images for pretraining (normalised on the device by the step), normalised float ones and labels
    for fine-tuning (its loader normalises on the CPU)."""
    shape = (batch_size, 3, opts.input_size, opts.input_size)
    if opts.mode == 'finetune':
        return torch.randn(shape, device=device), torch.randint(0, 1000, (batch_size,), device=device)
    return torch.randint(0, 256, shape, dtype=torch.uint8, device=device), torch.zeros(batch_size, dtype=torch.long)


def flops_per_image(args, device, opts, batch):
    """Matrix-product FLOPs of one eager fp32 training step (forward and backward, teacher included)."""
    run_epoch, _ = build(args, device, opts)
    counter = FlopCounterMode(display=False)
    with counter:
        run_epoch(SyntheticLoader(batch, 1), grad_scaler('fp32', device))
    return counter.get_total_flops() / len(batch[0])


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def quiet(fn, *args):
    """Run without the training loop's log lines, so the table stays readable."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def bench_step(opts, device, model_name, batch_size, precision, compile_):
    args = run_args(opts, model_name, batch_size, precision, compile_)
    batch = synthetic_batch(opts, batch_size, device)
    flops = quiet(flops_per_image, run_args(opts, model_name, batch_size, 'fp32', False), device, opts, batch)
    run_epoch, blocks = quiet(build, args, device, opts)
    runtime.compile_blocks(args, device, *blocks)
    scaler = grad_scaler(precision, device)
    quiet(run_epoch, SyntheticLoader(batch, opts.warmup), scaler)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    quiet(run_epoch, SyntheticLoader(batch, opts.steps), scaler)
    synchronize(device)
    seconds = (time.perf_counter() - start) / opts.steps
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == 'cuda' else float('nan')
    return batch_size / seconds, 1000 * seconds, peak, flops


def generate_jpegs(folder, count, seed=0):
    """ImageNet-like files: about 500x375 and 100+ KB each (smooth colour fields plus noise)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, 'train', 'n0'), exist_ok=True)
    for i in range(count):
        w, h = int(rng.integers(400, 560)), int(rng.integers(300, 420))
        base = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC), dtype=np.float32)
        img += rng.normal(0, 20, img.shape)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(
            os.path.join(folder, 'train', 'n0', f'{i:06d}.JPEG'), quality=90)
    return folder


def bench_loader(opts, batch_size):
    """Images/s of util.data's training loader (decode, crop, flip, collate; uint8 out); with --gpu_decode,
    workers read files and the batches are decoded and augmented on the device."""
    with tempfile.TemporaryDirectory(prefix='milan_jpegs_') as tmp:
        folder = opts.data_path or generate_jpegs(tmp, opts.generate)
        return _time_loader(image_folder(folder, 'train', pretrain_transform(opts.input_size)), opts, batch_size)


def _time_loader(dataset, opts, batch_size):
    device = torch.device(opts.device)
    loader = train_loader(dataset, batch_size, opts.num_workers, device.type == 'cuda', 0,
                          opts.input_size if opts.gpu_decode else None)
    loader.sampler.set_epoch(0)
    batches = iter(loader)
    next(batches)  # workers started
    count, start = 0, time.perf_counter()
    for images, _, _ in batches:
        if opts.gpu_decode:
            images, _ = decode_on_device(images, device, opts.input_size)
        count += len(images)
    synchronize(device)
    return count / (time.perf_counter() - start), len(dataset)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['mae_vit_base_patch16'], choices=sorted(models_milan.MODELS))
    parser.add_argument('--batch_sizes', nargs='+', type=int, default=[256])
    parser.add_argument('--precisions', nargs='+', default=['bf16'], choices=['bf16', 'fp16', 'fp32'])
    parser.add_argument('--compile', nargs='+', default=['on'], choices=['on', 'off'])
    parser.add_argument('--mode', default='milan', choices=sorted(MODES))
    parser.add_argument('--input_size', type=int, default=224)
    parser.add_argument('--teacher', default='vit_b16', choices=sorted(TEACHERS),
                        help='shape of the (random-weight) CLIP teacher: CLIP ViT-B/16 is the paper\'s')
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--warmup', type=int, default=5)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--peak_tflops', type=float, default=None)
    parser.add_argument('--loader', action='store_true', help='measure the input pipeline instead')
    parser.add_argument('--data_path', default=None, help='--loader: an image folder with train/')
    parser.add_argument('--generate', type=int, default=2000, help='--loader: JPEGs to generate without --data_path')
    parser.add_argument('--num_workers', type=int, default=16)
    parser.add_argument('--gpu_decode', action='store_true', help='--loader: decode on the device (nvJPEG)')
    opts = parser.parse_args()
    device = torch.device(opts.device)
    name = torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'
    peak = opts.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    print(f'# {name}; torch {torch.__version__}; {" ".join(sys.argv[1:])}')

    if opts.loader:
        print('| decode | batch | workers | images/s | files |\n| --- | --- | --- | --- | --- |')
        for batch_size in opts.batch_sizes:
            speed, files = bench_loader(opts, batch_size)
            where = f'{opts.device} (device)' if opts.gpu_decode else 'workers'
            print(f'| {where} | {batch_size} | {opts.num_workers} | {speed:,.0f} | {files} |')
        return
    print('| mode | model | batch | precision | compile | images/s | ms/step | peak GiB | GFLOP/image | MFU |')
    print('| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |')
    for model_name in opts.models:
        for batch_size in opts.batch_sizes:
            for precision in opts.precisions:
                for compile_ in opts.compile:
                    speed, ms, mem, flops = bench_step(opts, device, model_name, batch_size, precision,
                                                       compile_ == 'on')
                    mfu = f'{100 * flops * speed / (peak * 1e12):.1f}%' if peak else '-'
                    shown = model_name.replace('mae_', '') if opts.mode == 'finetune' else model_name
                    print(f'| {opts.mode} | {shown} | {batch_size} | {precision} | {compile_} | {speed:,.1f} '
                          f'| {ms:.1f} | {mem:.1f} | {flops / 1e9:.1f} | {mfu} |', flush=True)


if __name__ == '__main__':
    main()
