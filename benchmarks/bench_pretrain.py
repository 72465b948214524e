"""Pretraining speed: images/s, ms per step, peak GPU memory and model-FLOP utilisation of the real training step
(engine.train_epoch over engine_pretrain.batch_loss: teacher forward, masking, student forward and backward, fused
AdamW, the training loop's own checks), built by main_pretrain from its own flags; fed one synthetic batch already on
the device, or (--data jpeg) the real loader over a folder of JPEGs. --loader times the input pipeline alone.

    python benchmarks/bench_pretrain.py --models mae_vit_base_patch16 --batch_sizes 256 --compile on off
    python benchmarks/bench_pretrain.py --mode mae --batch_sizes 256                # MAE pixel baseline
    python benchmarks/bench_pretrain.py --data jpeg --generate 4000 --gpu_decode   # step fed from JPEGs
    python benchmarks/bench_pretrain.py --loader --generate 4000 [--gpu_decode]    # input pipeline alone
    python benchmarks/bench_pretrain.py --loader --sources folder shards           # folders against shards
    python benchmarks/bench_pretrain.py --device cpu --models mae_vit_tiny_patch8 --input_size 64 \\
        --batch_sizes 8 --precisions fp32 --compile off --steps 2 --warmup 1 --teacher tiny   # CPU smoke

FLOPs per image are counted (torch.utils.flop_counter on one eager fp32 step: matrix products and
attention), not assumed; utilisation divides the achieved FLOP/s by --peak_tflops. The teacher has random
weights of the chosen shape (--teacher vit_b16 is the paper's CLIP ViT-B/16): speed does not depend on weight
values, and nothing is downloaded.
"""
import argparse
import functools
import itertools
import os
import tempfile
import time

import torch

import common  # noqa: F401  (puts the repository on sys.path)
import engine
import engine_pretrain
import main_pretrain
import models_milan
from models_clip import build_random_teacher
from util import runtime
from tools.make_shards import make_shards
from util.data import image_folder, pretrain_transform, train_loader
from util.device_decode import decode_on_device
from util.logger import RunLogger

MODES = {  # main_pretrain flags of each setting
    'milan': ['--use_clip', '--change_decoder', '--attn_mask'],
    'mae': ['--norm_pix_loss'],
}
TEACHERS = {'vit_b16': dict(width=768, layers=12, output_dim=512), 'tiny': dict(width=64, layers=2, output_dim=64)}


def run_args(opts, model_name, batch_size, precision, compile_):
    """main_pretrain's own flags and defaults for this setting."""
    argv = ['--model', model_name, '--batch_size', str(batch_size), '--input_size', str(opts.input_size),
            '--precision', precision, '--device', opts.device, '--print_freq', '1000000', '--epochs', '1000',
            '--warmup_epochs', '1', '--compile' if compile_ else '--no-compile', *MODES[opts.mode]]
    args = main_pretrain.get_args_parser().parse_args(argv)
    args.lr, args.distributed, args.rank, args.world_size = 1e-4, False, 0, 1
    return args


def random_teacher(opts, args):
    """With --use_clip, a random-weight CLIP teacher of --teacher's shape on the student's patch grid."""
    if not args.use_clip:
        return None
    patch = models_milan.MODELS[args.model]['patch_size']
    return build_random_teacher(patch, args.input_size // patch, **TEACHERS[opts.teacher])


def build_models(opts, args, device):
    """main_pretrain's student and teacher for these flags, on the device, their blocks compiled when
    args.compile."""
    teacher = random_teacher(opts, args)
    if teacher is not None:
        teacher.to(device)
    model = main_pretrain.build_model(args, teacher).to(device)
    main_pretrain.compile_models(args, model, teacher)
    return model, teacher


def epoch_runner(args, device, model, teacher):
    """run_epoch(loader): the training epoch over `loader`, the optimizer, scaler and (when args.distributed)
    DDP wrapping set up as main_pretrain sets them up."""
    model, optimizer, scaler = runtime.prepare_training(args, model, device, main_pretrain.build_optimizer)
    logger = RunLogger(None, None)
    step = functools.partial(engine_pretrain.batch_loss, model, teacher, args=args, device=device)
    return lambda loader: engine.train_epoch(model, loader, step, optimizer, scaler, 0, args, device, logger)


def build(opts, args, device):
    """run_epoch(loader): the training epoch over `loader`, with main_pretrain's model, teacher and optimizer
    (compiled when args.compile)."""
    return epoch_runner(args, device, *build_models(opts, args, device))


def count_flops(opts, model_name, device):
    """FLOPs per image of the training step, counted on an eager fp32 build. Per image they do not depend on
    the batch size, so two images do."""
    run_epoch = common.quiet(build, opts, run_args(opts, model_name, 2, 'fp32', False), device)
    return common.flops_per_image(run_epoch, synthetic_batch(opts, 2, device))


def synthetic_batch(opts, batch_size, device):
    """uint8 images on the device, as the loader's batches arrive (the step normalises them)."""
    images = torch.randint(0, 256, (batch_size, 3, opts.input_size, opts.input_size), dtype=torch.uint8,
                           device=device)
    return images, torch.zeros(batch_size, dtype=torch.long), []


def jpeg_loader(opts, folder, batch_size, device):
    """main_pretrain's loader over `folder` (--gpu_decode: workers read bytes, the device decodes)."""
    dataset = common.quiet(image_folder, folder, 'train', pretrain_transform(opts.input_size), False)
    return train_loader(dataset, batch_size, opts.num_workers, device.type == 'cuda', 0,
                        opts.input_size if opts.gpu_decode else None)


def bench_steps(opts, device, folder):
    table = common.Table('mode', 'model', 'batch', 'precision', 'compile', 'data', 'images/s', 'ms/step',
                         'peak GiB', 'GFLOP/image', 'MFU')
    data = 'synthetic' if folder is None else f'jpeg, {opts.num_workers} workers' + (
        ', gpu decode' if opts.gpu_decode else '')
    peak = common.peak_tflops(opts, device)
    for model_name, batch_size in itertools.product(opts.models, opts.batch_sizes):
        flops = count_flops(opts, model_name, device)
        batch = synthetic_batch(opts, batch_size, device)
        for precision, compile_ in itertools.product(opts.precisions, opts.compile):
            run_epoch = common.quiet(build, opts, run_args(opts, model_name, batch_size, precision,
                                                           compile_ == 'on'), device)
            source = itertools.repeat(batch) if folder is None else \
                common.endless(jpeg_loader(opts, folder, batch_size, device))
            seconds, peak_gib = common.time_steps(run_epoch, source, opts, device)
            table.row(opts.mode, model_name, batch_size, precision, compile_, data,
                      *common.step_row(batch_size, seconds, peak_gib, flops, peak))
            del run_epoch, source
            common.release(device)


def loader_speed(opts, device, loader):
    """Images/s of the training loader alone (decode, crop, flip, collate; uint8 out) after --warmup batches;
    with --gpu_decode the workers read files and the batches are decoded and augmented on the device."""
    batches = common.endless(loader)

    def next_images():
        images = next(batches)[0]
        return decode_on_device(images, device, opts.input_size)[0] if opts.gpu_decode else images

    for _ in range(max(opts.warmup, 1)):  # workers started, first batches queued
        next_images()
    common.synchronize(device)
    start = time.perf_counter()
    count = sum(len(next_images()) for _ in range(opts.steps))
    common.synchronize(device)
    return count / (time.perf_counter() - start)


def bench_loader(opts, device, folder):
    """The loader over the image folder and (--sources shards) over tar shards made from it."""
    table = common.Table('source', 'decode', 'batch', 'workers', 'images/s', 'files')
    where = f'{device.type} (device)' if opts.gpu_decode else 'CPU workers'
    with tempfile.TemporaryDirectory(prefix='milan_shards_') as tmp:
        for source in opts.sources:
            root = folder
            if source == 'shards':
                common.quiet(make_shards, os.path.join(folder, 'train'), tmp, opts.shard_size)
                root = tmp
            for batch_size in opts.batch_sizes:
                loader = common.quiet(jpeg_loader, opts, root, batch_size, device)  # without the indexing line
                table.row(source, where, batch_size, opts.num_workers, f'{loader_speed(opts, device, loader):,.0f}',
                          len(loader.dataset))
                del loader


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser, models_milan.MODELS, 'mae_vit_base_patch16', 256)
    parser.add_argument('--mode', default='milan', choices=sorted(MODES),
                        help='milan: --use_clip --change_decoder --attn_mask; mae: the pixel baseline')
    parser.add_argument('--teacher', default='vit_b16', choices=sorted(TEACHERS),
                        help='shape of the random-weight CLIP teacher (vit_b16: the paper\'s CLIP ViT-B/16)')
    parser.add_argument('--gpu_decode', action='store_true', help='decode and augment on the device (nvJPEG)')
    parser.add_argument('--loader', action='store_true', help='time the input pipeline alone')
    parser.add_argument('--sources', nargs='+', default=['folder'], choices=['folder', 'shards'],
                        help='with --loader: read the image folder, tar shards made from it (tools/make_shards.py), '
                             'or both')
    parser.add_argument('--shard_size', type=int, default=1000, help='images per shard for --sources shards')
    return parser


def main():
    opts = get_args_parser().parse_args()
    device = torch.device(opts.device)
    common.print_header(device)
    if opts.loader or opts.data == 'jpeg':
        with common.jpeg_folder(opts) as folder:
            (bench_loader if opts.loader else bench_steps)(opts, device, folder)
    else:
        bench_steps(opts, device, None)


if __name__ == '__main__':
    main()
