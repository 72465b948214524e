"""Fine-tuning speed: images/s, ms per step, peak GPU memory and model-FLOP utilisation of the real training step
(engine.train_epoch over engine_finetune.batch_loss, with main_finetune's model, layer-decayed AdamW, drop path,
mixup/cutmix and label smoothing: the published recipe), fed one synthetic batch already on the device, or (--data
jpeg) the real loader (RandAugment, random erasing) over a folder of JPEGs.

    python benchmarks/bench_finetune.py --models vit_base_patch16 --batch_sizes 128 --compile on off
    python benchmarks/bench_finetune.py --data jpeg --generate 4000 --num_workers 16
    python benchmarks/bench_finetune.py --device cpu --models vit_tiny_patch8 --input_size 64 --batch_sizes 8 \\
        --precisions fp32 --compile off --steps 2 --warmup 1   # CPU smoke

FLOPs per image are counted on one eager fp32 step (matrix products and attention); utilisation divides the
achieved FLOP/s by --peak_tflops.
"""
import argparse
import functools
import itertools
from contextlib import nullcontext

import torch

import common  # noqa: F401  (puts the repository on sys.path)
import engine
import engine_finetune
import main_finetune
import models_vit
from util import runtime
from util.data import image_folder, train_loader
from util.logger import RunLogger
from util.precision import grad_scaler


def run_args(opts, model_name, batch_size, precision, compile_):
    """main_finetune's own flags and defaults (the published recipe) for this setting, 1000 classes."""
    argv = ['--model', model_name, '--batch_size', str(batch_size), '--input_size', str(opts.input_size),
            '--precision', precision, '--device', opts.device, '--print_freq', '1000000', '--epochs', '1000',
            '--warmup_epochs', '1', '--nb_classes', '1000', '--compile' if compile_ else '--no-compile']
    args = main_finetune.get_args_parser().parse_args(argv)
    args.lr, args.distributed, args.rank, args.world_size = 1e-4, False, 0, 1
    return args


def build(args, device):
    """run_epoch(loader): the fine-tuning epoch over `loader` with main_finetune's model, optimizer, loss and
    mixup (blocks compiled when args.compile)."""
    model = main_finetune.build_model(args).to(device)
    runtime.compile_blocks(args, model.blocks)
    optimizer = main_finetune.build_optimizer(args, model)
    criterion, mixup = main_finetune.build_criterion(args)
    scaler, logger = grad_scaler(args.precision, device), RunLogger(None, None)
    step = functools.partial(engine_finetune.batch_loss, model, criterion, device=device, mixup=mixup)
    return lambda loader: engine.train_epoch(model, loader, step, optimizer, scaler, 0, args, device, logger)


def count_flops(opts, model_name, device):
    """FLOPs per image of the training step, counted on an eager fp32 build. Per image they do not depend on
    the batch size, so two images do."""
    run_epoch = common.quiet(build, run_args(opts, model_name, 2, 'fp32', False), device)
    return common.flops_per_image(run_epoch, synthetic_batch(opts, 2, device))


def synthetic_batch(opts, batch_size, device):
    """Normalised float images and labels on the device (the fine-tuning loader normalises on the CPU)."""
    shape = (batch_size, 3, opts.input_size, opts.input_size)
    return torch.randn(shape, device=device), torch.randint(0, 1000, (batch_size,), device=device), []


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser, models_vit.MODELS, 'vit_base_patch16', 128)
    return parser


def main():
    opts = get_args_parser().parse_args()
    device = torch.device(opts.device)
    common.print_header(device)
    with common.jpeg_folder(opts) if opts.data == 'jpeg' else nullcontext() as folder:
        table = common.Table('model', 'batch', 'precision', 'compile', 'data', 'images/s', 'ms/step', 'peak GiB',
                             'GFLOP/image', 'MFU')
        data = 'synthetic' if folder is None else f'jpeg, {opts.num_workers} workers'
        peak = common.peak_tflops(opts, device)
        for model_name, batch_size in itertools.product(opts.models, opts.batch_sizes):
            flops = count_flops(opts, model_name, device)
            batch = synthetic_batch(opts, batch_size, device)
            for precision, compile_ in itertools.product(opts.precisions, opts.compile):
                args = run_args(opts, model_name, batch_size, precision, compile_ == 'on')
                run_epoch = common.quiet(build, args, device)
                if folder is None:
                    source = itertools.repeat(batch)
                else:
                    dataset = common.quiet(image_folder, folder, 'train', main_finetune.train_transform(args))
                    source = common.endless(train_loader(dataset, batch_size, opts.num_workers,
                                                         device.type == 'cuda', 0))
                seconds, peak_gib = common.time_steps(run_epoch, source, opts, device)
                table.row(model_name, batch_size, precision, compile_, data,
                          *common.step_row(batch_size, seconds, peak_gib, flops, peak))
                del run_epoch, source
                common.release(device)


if __name__ == '__main__':
    main()
