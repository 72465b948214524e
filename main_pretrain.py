"""MILAN pretraining: a ViT learns to predict a frozen CLIP image encoder's per-token features from a
masked view of the image. Without --data_path it runs a small CPU demo on generated images."""
if __name__ == '__main__':  # first of all: a stop signal during the imports below then ends the run with a line
    from util.preemption import STOP
    STOP.install(early=True)

import functools
import os
import time

import torch

import engine
import engine_knn
import engine_pretrain
import models_milan
import visualize
from models_teacher import build_teacher
from util import cli, config, runtime
from util.checkpoint import find_resume, resume_training, save_training
from util.data import BadImages, image_folder, pretrain_transform, train_loader
from util.distributed import cleanup, main_first
from util.errors import UserError, check
from util.logger import log
from util.optim import adamw, param_groups_weight_decay

KIND = 'pretrain'
METHOD = models_milan.FLAG_DEFAULTS
# A resumed run must build the same model as the checkpoint's and train it by the same method.
RESUME_FLAGS = ('model', 'input_size', 'use_clip', 'change_decoder', 'mask_ratio', 'attn_mask')
# what defines the teacher's target
TEACHER_FLAGS = ('clip_model', 'teacher_weights', 'teacher_input_size', 'average_targets', 'teacher_input_norm')
PIXEL_FLAGS = ('norm_pix_loss',)  # what defines the pixel target

# The demo: a tiny ViT and a random tiny CLIP teacher on generated 64x64 images, ~30 s on 2 CPU cores.
DEMO_DEFAULTS = dict(model='mae_vit_tiny_patch8', input_size=64, batch_size=32, epochs=10, warmup_epochs=1,
                     blr=1e-2, num_workers=2, print_freq=4, save_every=5, clip_model='random',
                     use_clip=True, change_decoder=True, attn_mask=True, knn_every=2,
                     output_dir='./output_demo/pretrain')


def get_args_parser():
    parser = cli.make_parser('MILAN pretraining', __doc__, DEMO_DEFAULTS)
    cli.add_common_args(parser)
    parser.set_defaults(batch_size=256, blr=1.5e-4, output_dir='./output_dir')
    g = parser.add_argument_group('MILAN')
    g.add_argument('--model', default=METHOD['model'], choices=sorted(models_milan.MODELS),
                   help='student size (mae_vit_tiny_patch8 is the demo\'s)')
    g.add_argument('--mask_ratio', type=float, default=METHOD['mask_ratio'],
                   help='fraction of patches hidden from the encoder')
    cli.bool_flag(g, 'use_clip', 'predict the teacher\'s (--clip_model) per-token features instead of pixels')
    cli.bool_flag(g, 'change_decoder', 'use the prompting decoder instead of the MAE decoder')
    cli.bool_flag(g, 'attn_mask', 'semantic-aware masking guided by the teacher\'s class-token attention')
    cli.bool_flag(g, 'norm_pix_loss', 'pixel target: normalise each patch by its mean and variance')
    cli.bool_flag(g, 'gpu_decode', 'decode and augment JPEGs on the training device (nvJPEG on GPUs); workers '
                                   'only read files')
    g.add_argument('--clip_model', default=METHOD['clip_model'],
                   help='the teacher: an OpenAI CLIP name (downloaded once into --clip_cache), an OpenAI TorchScript '
                        '.pt or state-dict file, or timm:<model name> for any timm ViT (CLIP, SigLIP, DINO, DINOv2, '
                        'DINOv3, ...: see the README); "random" is a random tiny CLIP for smoke tests only')
    g.add_argument('--teacher_weights', default=METHOD['teacher_weights'],
                   help='with timm:<name>: a weight file (timm, open_clip or SLIP format) instead of timm\'s '
                        'pretrained download')
    g.add_argument('--teacher_input_size', type=int, default=METHOD['teacher_input_size'],
                   help='the teacher sees the batch resized (bicubic) to this size, e.g. 196 for a /14 teacher '
                        'under a /16 student at 224 (default: the student\'s --input_size)')
    g.add_argument('--clip_cache', default=config.cache_dir('clip'), help='where named CLIP models are downloaded')
    g.add_argument('--average_targets', type=int, default=METHOD['average_targets'],
                   help='average the teacher outputs of the last K blocks as the target')
    g.add_argument('--vis_every', type=int, default=20,
                   help='every N epochs, visualize.py\'s panels for a few fixed images go to TensorBoard (0: off)')
    g.add_argument('--vis_images', type=int, default=4, help='how many images those panels show')
    g.add_argument('--knn_every', type=int, default=20,
                   help='every N epochs, the encoder\'s k-NN top-1/top-5 (main_knn.py\'s protocol) on subsets of '
                        'train/ and val/ goes to log.txt and TensorBoard (0: off; skipped without labelled val/)')
    g.add_argument('--knn_train_subset', type=int, default=20000,
                   help='train/ images the k-NN monitor reads (with the val subset: ~1%% of an ImageNet epoch)')
    g.add_argument('--knn_val_subset', type=int, default=5000, help='val/ images the k-NN monitor classifies')
    g.add_argument('--teacher_input_norm', default=METHOD['teacher_input_norm'],
                   choices=['imagenet', 'clip', 'teacher'],
                   help='normalisation of the teacher\'s input: ImageNet\'s (as the released code), CLIP\'s, or the '
                        'teacher\'s own (from its pretrained configuration)')
    return parser


def validate_args(args):
    cli.validate_common(args)
    check(0 < args.mask_ratio < 1, f'--mask_ratio must be between 0 and 1 (exclusive), got {args.mask_ratio}')
    check(not args.attn_mask or args.use_clip,
          '--attn_mask needs the teacher\'s attention: add --use_clip or drop --attn_mask')
    if args.norm_pix_loss and args.use_clip:  # the released recipes pass both
        log('note: --norm_pix_loss has no effect on the CLIP target (it normalises pixel targets only)')
    check(args.average_targets == 1 or args.use_clip, '--average_targets needs --use_clip')
    check(args.vis_every >= 0 and args.vis_images >= 1, '--vis_every must be >= 0 and --vis_images >= 1')
    check(args.knn_every >= 0 and min(args.knn_train_subset, args.knn_val_subset) >= 1,
          '--knn_every must be >= 0 and the k-NN subsets at least 1 image')
    check(args.average_targets >= 1, f'--average_targets must be at least 1, got {args.average_targets}')
    check(not args.teacher_weights or args.clip_model.startswith('timm:'),
          '--teacher_weights goes with --clip_model timm:<model name>; an OpenAI CLIP file is passed as --clip_model')
    check(not args.teacher_weights or os.path.isfile(args.teacher_weights),
          f'--teacher_weights {args.teacher_weights}: no such file')
    check(args.teacher_input_size is None or args.teacher_input_size >= 8,
          f'--teacher_input_size must be at least 8 pixels, got {args.teacher_input_size}')
    check(args.use_clip or (args.teacher_input_size is None and not args.teacher_weights),
          '--teacher_input_size and --teacher_weights need --use_clip (a teacher target)')


def build_model(args, teacher):
    """The student (on the CPU) for these flags; its prediction width is the teacher's feature width."""
    model = models_milan.create_from_flags(vars(args), teacher.output_dim if teacher is not None else 512)
    check(model.num_visible(args.mask_ratio) >= 1,
          f'--mask_ratio {args.mask_ratio} leaves no visible patch out of {model.num_patches}')
    return model


def build_optimizer(args, model):
    return adamw(param_groups_weight_decay(model, args.weight_decay), args.lr, (0.9, 0.95),
                 next(model.parameters()).device)


def compile_models(args, model, teacher):
    """--compile: the student's encoder and decoder blocks and the teacher's blocks."""
    runtime.compile_blocks(args, model.blocks, model.decoder_blocks, teacher.blocks if teacher is not None else [])


def fixed_images(dataset, count, size):
    """The same few readable images, spread over the dataset, so TensorBoard's panels show how masks,
    losses and attention evolve."""
    images = []
    for i in range(0, len(dataset), max(1, len(dataset) // count)):
        try:
            images.append(visualize.panel_input([dataset.image(i)], size))
        except UserError:
            continue
        if len(images) == count:
            break
    return torch.cat(images) if images else None


def knn_sets(args):
    """(train subset, val subset, classes) for the k-NN monitor, or None (with a note) when --data_path has no
    labelled train/ and val/ (a flat folder, unlabelled shards)."""
    if not args.knn_every:
        return None
    try:
        return engine_knn.knn_sets(args.data_path, args.input_size, args.knn_train_subset, args.knn_val_subset)
    except UserError as e:
        log(f'note: the k-NN monitor is off: it needs labelled train/ and val/ images ({e})')
        return None


def knn_monitor(args, model, sets, device):
    """The encoder's k-NN top-1/top-5 now (eager: a few thousand images do not pay for compiling inference
    graphs), as main_knn.py measures a checkpoint with its default flags."""
    train, val, classes = sets
    model.eval()
    try:  # the global RNG, which masking draws from, left as it was: runs with and without the monitor agree
        with torch.compiler.set_stance('force_eager'), torch.random.fork_rng(
                devices=[device] if device.type == 'cuda' else [], device_type=device.type):
            stats = engine_knn.knn_evaluate(lambda x: model.features(x)[:, 0], train, val, classes, 20, 0.07,
                                            args.batch_size, args.num_workers, device, args.precision)
    finally:
        model.train()
    return {f'knn_{k}': v for k, v in stats.items()}


def main(args):
    validate_args(args)
    device = runtime.start(args)
    found = find_resume(args, KIND, RESUME_FLAGS + (TEACHER_FLAGS if args.use_clip else PIXEL_FLAGS))

    dataset = image_folder(args.data_path, 'train', pretrain_transform(args.input_size), labelled=False)
    loader = train_loader(dataset, args.batch_size, args.num_workers, args.pin_mem and device.type == 'cuda',
                          args.seed, args.input_size if args.gpu_decode else None, args.max_bad_frac)
    patch_size = models_milan.MODELS[args.model]['patch_size']
    check(args.input_size % patch_size == 0,
          f'--input_size {args.input_size} is not a multiple of {args.model}\'s {patch_size}px patches')
    with main_first():  # one download into the cache (timm's or OpenAI's), which the other processes then read
        teacher = build_teacher(args, patch_size, args.input_size // patch_size)
    model = build_model(args, teacher).to(device)
    if teacher is not None:
        teacher.to(device)
    compile_models(args, model, teacher)

    target = f'{args.clip_model} features' if args.use_clip else 'pixels'
    log(f'model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; target {target}, '
        f'{"prompting" if args.change_decoder else "MAE"} decoder, {"semantic-aware" if args.attn_mask else "random"} '
        f'masking of {args.mask_ratio:.0%}; {device}')
    model_without_ddp = model
    model, optimizer, scaler = runtime.prepare_training(args, model_without_ddp, device, build_optimizer)
    start, resumed = resume_training(args, model_without_ddp, optimizer, scaler, KIND, found=found)
    progress = resumed.get('epoch_progress') if resumed else None  # the sums of the epoch it stopped in
    del found, resumed  # the checkpoint's tensors, which would stay in host memory for the whole run
    logger = runtime.open_logger(args, start[0])
    bad_images = BadImages(len(dataset), args.max_bad_frac)
    vis_images = fixed_images(dataset, args.vis_images, args.input_size) if logger.writer else None
    knn = knn_sets(args)
    epoch_steps = engine.iterations_per_epoch(loader, args.accum_iter)  # the x-axis of every scalar

    step = functools.partial(engine_pretrain.batch_loss, model, teacher, args=args, device=device,
                             bad_images=bad_images)

    def save(epoch, resume_iter=0, progress=None):
        save_training(args, epoch, model_without_ddp, optimizer, scaler, KIND, resume_iter, progress=progress)

    start_time = time.time()
    (epoch, start_iter), completed = start, not engine.stop_requested('before training started, nothing new to save')
    while completed and epoch < args.epochs:
        loader.sampler.set_epoch(epoch, start_iter)
        stats = engine.train_epoch(model, loader, step, optimizer, scaler, epoch, args, device, logger, start_iter,
                                   bad_images, save, progress)
        if stats.stopped:  # saved where it stopped
            completed = False
            break
        log(f'epoch {epoch} done: loss {stats.loss:.4f}, {stats.images_per_sec:.1f} img/s')
        last = epoch + 1 == args.epochs
        record = {'epoch': epoch, **stats.logged()}
        if knn is not None and ((epoch + 1) % args.knn_every == 0 or last):
            record.update(knn_monitor(args, model_without_ddp, knn, device))
            logger.scalars((epoch + 1) * epoch_steps, knn_acc1=record['knn_acc1'], knn_acc5=record['knn_acc5'])
            log(f'epoch {epoch}: k-NN top-1 {record["knn_acc1"]:.2f}% top-5 {record["knn_acc5"]:.2f}%')
        logger.epoch(record)
        if vis_images is not None and args.vis_every and ((epoch + 1) % args.vis_every == 0 or last):
            grids = visualize.panels(model_without_ddp, teacher, vis_images.to(device), args.mask_ratio,
                                     teacher_input_norm=args.teacher_input_norm, attn_mask=args.attn_mask,
                                     zoom=visualize.readable_zoom(args.input_size)).grids
            logger.writer.add_images('panels', grids, epoch, dataformats='NHWC')
        completed = engine.end_epoch(stats, save, epoch, last)
        epoch, start_iter, progress = epoch + 1, 0, None
    logger.close()
    engine.log_run_end(start_time, completed)
    cleanup()
    return {'completed': completed}


if __name__ == '__main__':
    cli.run(main, cli.parse_args(get_args_parser(), DEMO_DEFAULTS))
