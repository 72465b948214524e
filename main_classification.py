"""What main_finetune.py and main_linprobe.py share (not a script of its own): flags, data, the epoch loop with
evaluation, best and last checkpoints, --eval. The two differ only in the model, optimizer, augmentation and
loss they pass."""
import argparse
import functools
import os
import time

import engine
import engine_finetune
from util import cli, config, runtime
from util.checkpoint import find_resume, load_checkpoint, load_model_state, resume_training, save_atomic, \
    save_training
from util.data import BadImages, eval_loader, eval_transform, image_folder, train_loader
from util.distributed import broadcast_buffers, cleanup, is_main
from util.errors import UserError, check
from util.logger import log

# A resumed run must build the same classifier as the checkpoint's.
RESUME_FLAGS = ('model', 'input_size', 'nb_classes', 'global_pool')


def add_classification_args(parser, model_choices):
    cli.add_common_args(parser)
    g = parser.add_argument_group('classification')
    g.add_argument('--model', default='vit_base_patch16', choices=sorted(model_choices),
                   help='classifier size; must match the pretrained encoder (vit_tiny_patch8 is the demo\'s)')
    g.add_argument('--finetune', default='', help='pretraining checkpoint to start from (ours, MAE or MILAN)')
    g.add_argument('--nb_classes', type=int, default=1000, help='classes in train/ and val/')
    g.add_argument('--eval', action='store_true', help='only evaluate the --resume checkpoint on val/')
    # MAE's recipes pass it; evaluation here is always sharded exactly over processes, so it changes nothing
    g.add_argument('--dist_eval', action='store_true', help=argparse.SUPPRESS)
    g.add_argument('--global_pool', action='store_true', help='average the patch tokens (with a LayerNorm)')
    g.add_argument('--cls_token', action='store_false', dest='global_pool', help='use the class token instead')
    return parser


def validate_args(args):
    cli.validate_common(args)
    check(not args.eval or args.resume, '--eval needs --resume CHECKPOINT to evaluate')
    check(not args.finetune or os.path.isfile(args.finetune), f'--finetune {args.finetune}: no such file')
    if args.dist_eval:
        log('note: --dist_eval can be dropped: evaluation is always sharded exactly over the processes')


def check_classes(dataset, args, split):
    found = len(dataset.classes)
    if found != args.nb_classes:
        raise UserError(f'{split}/ holds {found} classes but --nb_classes is {args.nb_classes}; '
                        f'pass --nb_classes {found}')


def run(args, kind, build_model, build_optimizer, train_transform, criterion, mixup=None):
    """Build data and model, then evaluate (--eval) or train with evaluation after every epoch.

    build_model(args) -> model on the CPU (pretrained weights loaded); build_optimizer(args, model).
    Returns the last evaluation's stats, best_acc1 and whether training completed (not stopped by a signal).
    """
    validate_args(args)
    device = runtime.start(args)
    found = (None, None) if args.eval else find_resume(args, kind, RESUME_FLAGS)
    train_set = image_folder(args.data_path, 'train', train_transform)
    val_set = image_folder(args.data_path, 'val', eval_transform(args.input_size))
    check_classes(train_set, args, 'train')
    check_classes(val_set, args, 'val')
    pin = args.pin_mem and device.type == 'cuda'
    val = eval_loader(val_set, args.batch_size, args.num_workers, pin)

    model = build_model(args).to(device)
    runtime.compile_blocks(args, model.blocks)
    log(f'model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, '
        f'{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trained; {device}')
    model_without_ddp = model
    model, optimizer, scaler = runtime.prepare_training(args, model_without_ddp, device, build_optimizer)

    if args.eval:
        ckpt = load_checkpoint(args.resume, kind)
        load_model_state(model_without_ddp, ckpt['model'], args.resume)
        stats = engine_finetune.evaluate(model, val, device, args.precision)
        log(f'{args.resume} on {len(val_set)} images: top-1 {stats["acc1"]:.2f}% top-5 {stats["acc5"]:.2f}%')
        cleanup()
        return stats

    loader = train_loader(train_set, args.batch_size, args.num_workers, pin, args.seed, max_bad_frac=args.max_bad_frac)
    start, resumed = resume_training(args, model_without_ddp, optimizer, scaler, kind, found=found)
    best = resumed.get('best_acc1', 0.0) if resumed else 0.0
    progress = resumed.get('epoch_progress') if resumed else None  # the sums of the epoch it stopped in
    del found, resumed  # the checkpoint's tensors, which would stay in host memory for the whole run
    last = {}
    logger = runtime.open_logger(args, start[0])
    bad_images = BadImages(len(train_set), args.max_bad_frac)

    step = functools.partial(engine_finetune.batch_loss, model, criterion, device=device, mixup=mixup)
    epoch_steps = engine.iterations_per_epoch(loader, args.accum_iter)  # validation shares training's step axis

    def save(epoch, resume_iter=0, progress=None):
        save_training(args, epoch, model_without_ddp, optimizer, scaler, kind, resume_iter, {'best_acc1': best},
                      progress)

    start_time = time.time()
    (epoch, start_iter), completed = start, not engine.stop_requested('before training started, nothing new to save')
    while completed and epoch < args.epochs:
        loader.sampler.set_epoch(epoch, start_iter)
        train_stats = engine.train_epoch(model, loader, step, optimizer, scaler, epoch, args, device, logger,
                                         start_iter, bad_images, save, progress)
        if train_stats.stopped:  # saved where it stopped
            completed = False
            break
        broadcast_buffers(model_without_ddp)
        stats = engine_finetune.evaluate(model, val, device, args.precision)
        if stats['acc1'] > best and is_main() and args.output_dir:
            save_atomic({'kind': kind, 'model': model_without_ddp.state_dict(), 'epoch': epoch,
                         'best_acc1': stats['acc1'], 'args': config.plain(args)},
                        os.path.join(args.output_dir, 'checkpoint-best.pth'))
        best = max(best, stats['acc1'])
        last = stats
        logger.scalars((epoch + 1) * epoch_steps, **{f'val_{k}': v for k, v in stats.items()})
        logger.epoch({'epoch': epoch, **train_stats.logged(), **{f'val_{k}': v for k, v in stats.items()}})
        log(f'epoch {epoch}: val top-1 {stats["acc1"]:.2f}% top-5 {stats["acc5"]:.2f}% (best {best:.2f}%), '
            f'train loss {train_stats.loss:.4f}')
        final = epoch + 1 == args.epochs
        completed = engine.end_epoch(train_stats, save, epoch, final)
        epoch, start_iter, progress = epoch + 1, 0, None
    logger.close()
    engine.log_run_end(start_time, completed, f'; best top-1 {best:.2f}%')
    cleanup()
    return {**last, 'best_acc1': best, 'completed': completed}
