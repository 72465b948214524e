"""What a MILAN pretraining checkpoint does: one PNG per image, the checkpoint and its epoch on top, then six cells
in two rows of three, each panel at least READABLE pixels wide under its label:

  image        | mask         | teacher attn
  loss         | student attn | colour scale

(a) the image, resized and centre-cropped as evaluation does; (b) the semantic-aware mask: masked patches
grey, visible ones untouched, drawn from the teacher's importance (random masking when there is no
teacher); (c) the teacher's class-token attention to the patches; (d) the per-patch loss of the student's
prediction under that mask (2 - 2cos for the CLIP target, MSE for pixels) on the masked patches, visible
patches drawn at zero (the colour map's darkest end); (e) the student's last-block class-token attention
with every patch visible. Heat maps are scaled per image: attention from its minimum to its maximum, loss
from zero to its maximum; the colour scale shows the colour map and each map's range of that image.

    python visualize.py --checkpoint output_demo/pretrain/checkpoint-last.pth --out_dir vis

The checkpoint may be ours or a released MAE/MILAN pretraining file (MAE's layout or MMPretrain's), read as
`tools.checkpoint_tools import-mae` reads it. `panels` renders the same grids for TensorBoard, one image per
sample: writer.add_images(tag, grids, step, dataformats='NHWC').
"""
import argparse
import functools
import os
from typing import NamedTuple, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision import transforms

import models_milan
from models_teacher import build_teacher
from tools.checkpoint_tools import released_mmpretrain, released_pretraining
from util import cli, config
from util.checkpoint import load_model_state
from util.data import eval_geometry, load_rgb, to_device_normalized
from util.demo_data import ensure_demo_dataset
from util.errors import UserError, check
from util.logger import log
from util.pretrained import checkpoint_epoch, model_state, read_checkpoint

PAD = 4  # pixels around and between cells
READABLE = 160  # pixels a panel needs for its map to be read and its label to fit: panels are never smaller
LABEL_H = 14  # label band above each panel (and the title band on top)
FONT_PX = LABEL_H - 3
COLUMNS, ROWS = 3, 2  # five panels and the colour scale
GREY = 40  # masked patches in panel (b): dark, so they stand out from grey backgrounds
EXTENSIONS = ('.jpg', '.jpeg', '.png')
# Viridis-like anchors (dark purple -> blue -> green -> yellow), interpolated into a 256-entry table.
_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
COLORMAP = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c])
                     for c in range(3)], axis=1).round().astype(np.uint8)


class Panels(NamedTuple):
    grids: np.ndarray  # uint8 [N, H, W, 3], (H, W, 3) = grid_shape(input size, zoom, titled)
    mask: torch.Tensor  # [N, L], 1 = masked, in image order
    scales: list  # per image, (heat map, value at the colour map's low end, at its high end) as the scale shows


def read_pretrain_checkpoint(path):
    """(model in eval mode, the run's flags, a title naming the file and its epoch) of a pretraining checkpoint:
    ours, or a released MAE/MILAN/MMPretrain pretraining file (converted in memory, as import-mae does)."""
    ckpt = read_checkpoint(path)
    kind = ckpt.get('kind')
    if kind == 'pretrain':
        state = model_state(ckpt, path)
        args = {**models_milan.FLAG_DEFAULTS, **ckpt.get('args', {})}
        model = models_milan.create_from_flags(args, state['decoder_pred.weight'].shape[0])
        load_model_state(model, state, path)
    elif kind is None:  # not written by this repository: a released file, or refused naming why
        model, released = released_pretraining(ckpt, path)
        args = {**models_milan.FLAG_DEFAULTS, **released}
        if args['use_clip'] and 'clip_model' not in released and released_mmpretrain(ckpt)[1]:
            args['clip_model'] = path  # MMPretrain's MILAN file carries its CLIP teacher: no download
    else:
        raise UserError(f'{path} is not a pretraining checkpoint (kind {kind!r}); pass the pretraining checkpoint '
                        f'it started from (or a released MAE/MILAN pretraining file)')
    model.eval()
    epoch = checkpoint_epoch(ckpt)
    if epoch is None:
        when = 'epoch ?'
    elif ckpt.get('resume_iter'):
        when = f'stopped in epoch {epoch} at iteration {ckpt["resume_iter"]}'
    else:
        when = f'epoch {epoch} done'
    return model, args, f'{os.path.basename(path)}: {when}'


def checkpoint_teacher(model, args, path, clip_model=None, clip_cache=None):
    """The teacher main_pretrain built for the run `args` describes, or None; `clip_model` overrides it (a
    pixel-target checkpoint gets a teacher only when one is named)."""
    use_clip = bool(args['use_clip'])
    named = clip_model is not None  # another teacher than the checkpoint's: its own weights and size
    teacher_args = argparse.Namespace(use_clip=use_clip or named, clip_model=clip_model or args['clip_model'],
                                      clip_cache=clip_cache or config.cache_dir('clip'),
                                      average_targets=args['average_targets'],
                                      teacher_weights='' if named else args['teacher_weights'],
                                      teacher_input_size=None if named else args['teacher_input_size'])
    teacher = build_teacher(teacher_args, model.patch_size, model.grid_size)
    if use_clip and teacher.output_dim != model.decoder_pred.out_features:
        raise UserError(f'the teacher {teacher_args.clip_model} gives {teacher.output_dim}-d targets but {path} '
                        f'predicts {model.decoder_pred.out_features}-d ones; pass the --clip_model it was trained with')
    return teacher


def load_pretrain_checkpoint(path, clip_model=None, clip_cache=None):
    """(model in eval mode, teacher or None, the checkpoint's args) as main_pretrain built them; see
    checkpoint_teacher for `clip_model`."""
    model, args, _ = read_pretrain_checkpoint(path)
    return model, checkpoint_teacher(model, args, path, clip_model, clip_cache), args


def _heat(values, grid, patch, lower=None):
    """[N, L] -> (uint8 [N, grid*patch, grid*patch, 3], low [N], high [N]): scaled to [0, 1] per image (from
    `lower`, default the minimum, to the maximum), coloured, each patch a block; low and high are the values
    the colour map's two ends stand for."""
    values = values.float().cpu()
    lo = values.amin(1, keepdim=True) if lower is None else torch.full_like(values[:, :1], lower)
    hi = values.amax(1, keepdim=True)
    index = ((values - lo) / (hi - lo).clamp_min(1e-12) * 255).round().clamp(0, 255).long().numpy()
    return _blocks(COLORMAP[index].reshape(-1, grid, grid, 3), patch), lo[:, 0].tolist(), hi[:, 0].tolist()


def _blocks(per_patch, patch):
    """[N, g, g, ...] -> [N, g*patch, g*patch, ...] by repeating each patch's value."""
    return per_patch.repeat(patch, axis=1).repeat(patch, axis=2)


def _per_patch_loss(model, images, pred, targets):
    """[N, L] loss of each patch token, as the model's loss computes it before averaging."""
    if model.target == 'clip':
        return models_milan.clip_token_losses(pred[:, 1:], targets[:, 1:])
    return models_milan.pixel_patch_losses(pred, models_milan.patchify(images, model.patch_size), model.norm_pix_loss)


@torch.no_grad()
def panels(model, teacher, images, mask_ratio=0.75, seed=0, teacher_input_norm='imagenet', zoom=None,
           attn_mask=False, title=None):
    """The five panels of each image and the colour scale in a labelled grid, and the mask drawn for them.

    model: a MilanViT (unwrapped from DDP; its train/eval mode is restored); teacher: its ClipTeacher on the
    same device, or None (blank panel c); images: uint8 [N, 3, S, S]. The mask is drawn as the run trained:
    semantic-aware from the teacher's attention with `attn_mask`, else random; under `seed`, without
    touching the global RNG. Each panel is S x panel_zoom(S, zoom) pixels (nearest neighbour), at least READABLE;
    `title` (e.g. the checkpoint and its epoch) adds a band on top.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        # Eager even when training compiled the blocks: a few images do not pay for compiling inference graphs.
        with torch.compiler.set_stance('force_eager'):
            x = to_device_normalized(images, device)
            with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else [], device_type=device.type):
                torch.manual_seed(seed)
                _, pred, mask, targets, importance = models_milan.batch_loss(model, teacher, x, mask_ratio, attn_mask,
                                                                             teacher_input_norm)
            loss = _per_patch_loss(model, x, pred, targets) * mask
            student = model.cls_attention(x)
    finally:
        model.train(was_training)

    grid, patch = model.grid_size, model.patch_size
    image = images.permute(0, 2, 3, 1).cpu().numpy()
    masked = _blocks(mask.bool().cpu().numpy().reshape(-1, grid, grid), patch)
    loss_map, *loss_range = _heat(loss, grid, patch, lower=0.0)
    student_map, *student_range = _heat(student, grid, patch)
    scales = [('loss (masked)', *loss_range), ('student attn', *student_range)]
    if importance is not None:
        teacher_map, *teacher_range = _heat(importance, grid, patch)
        scales.insert(0, ('teacher attn', *teacher_range))
    else:
        teacher_map = np.full_like(image, GREY)
    columns = [image, np.where(masked[..., None], np.uint8(GREY), image), teacher_map, loss_map, student_map]
    labels = ['image', f'mask {mask_ratio:.0%}', 'teacher attn' if teacher is not None else 'no teacher',
              'loss (masked)', 'student attn']
    size = images.shape[-1] * panel_zoom(images.shape[-1], zoom)
    scales = [[(name, lo[i], hi[i]) for name, lo, hi in scales] for i in range(len(image))]
    grids = [_compose([c[i] for c in columns], labels, scales[i], size, title) for i in range(len(image))]
    return Panels(np.stack(grids), mask.cpu(), scales)


def readable_zoom(input_size: int) -> int:
    """The zoom that makes an `input_size` panel at least READABLE pixels wide (1 at 224 px, 3 for the demo's 64)."""
    return max(1, -(-READABLE // input_size))


def panel_zoom(input_size: int, zoom: Optional[int] = None) -> int:
    """The zoom panels get: `zoom` (default 1), raised to readable_zoom so that maps and labels can be read."""
    return max(zoom or 1, readable_zoom(input_size))


def _top(titled):
    return PAD + (LABEL_H + PAD if titled else 0)


def grid_shape(input_size: int, zoom: Optional[int] = None, titled: bool = False) -> tuple:
    """(H, W, 3) of one image's grid from `panels`."""
    return _canvas_shape(input_size * panel_zoom(input_size, zoom), titled)


def _canvas_shape(size, titled):
    return _top(titled) + ROWS * (LABEL_H + size + PAD), PAD + COLUMNS * (size + PAD), 3


def cell_origin(index: int, size: int, titled: bool = False) -> tuple:
    """(x, y) of the top-left pixel of cell `index`'s panel (0-4 the panels in reading order, 5 the colour
    scale), whose label band lies just above it, for panels of `size` pixels."""
    row, column = divmod(index, COLUMNS)
    return PAD + column * (size + PAD), _top(titled) + row * (LABEL_H + size + PAD) + LABEL_H


@functools.lru_cache(maxsize=1)
def _font():
    return ImageFont.load_default(size=FONT_PX)


def fit(text, width, font=None):
    """`text`, cut and ended with '...' when it is wider than `width` pixels, so that it never leaves its cell."""
    font = font or _font()
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + '...') > width:
        text = text[:-1]
    return text + '...'


def _number(value):
    return f'{value:.2g}'


def _colour_scale(size, scales):
    """The sixth cell: the colour map as a vertical bar (high at the top) and, beside it, the values its two
    ends stand for in each heat map of this image."""
    font = _font()
    cell = Image.new('RGB', (size, size), 'white')
    bar_w, margin, line = max(10, size // 12), 2, FONT_PX + 4
    index = np.linspace(255, 0, size - 2 * margin).round().astype(np.int64)
    cell.paste(Image.fromarray(np.ascontiguousarray(np.repeat(COLORMAP[index][:, None], bar_w, axis=1))),
               (margin, margin))
    draw = ImageDraw.Draw(cell)
    x = margin + bar_w + 6
    width = size - x - margin
    draw.text((x, margin), fit('high', width, font), fill='black', font=font)
    for i, (name, lo, hi) in enumerate(scales):
        y = margin + line * (1 + 2 * i) + line // 2
        draw.text((x, y), fit(name, width, font), fill='black', font=font)
        draw.text((x + 6, y + line), fit(f'{_number(lo)} to {_number(hi)}', width - 6, font), fill='black',
                  font=font)
    draw.text((x, size - margin - line), fit('low', width, font), fill='black', font=font)
    return cell


def _compose(columns, labels, scales, size, title):
    """One uint8 [H, W, 3] grid: a white canvas, the title band, the labelled panels and the colour scale."""
    height, width, _ = _canvas_shape(size, title is not None)
    canvas = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(canvas)
    font = _font()
    if title is not None:
        draw.text((PAD, PAD), fit(title, width - 2 * PAD, font), fill='black', font=font)
    for i, (column, label) in enumerate([*zip(columns, labels), (None, 'colour scale (per image)')]):
        x, y = cell_origin(i, size, title is not None)
        panel = _colour_scale(size, scales) if column is None else Image.fromarray(column).resize((size, size),
                                                                                                    Image.NEAREST)
        canvas.paste(panel, (x, y))
        draw.text((x, y - LABEL_H), fit(label, size, font), fill='black', font=font)
    return np.asarray(canvas)


def image_paths(sources, count):
    """Files as given, folders searched recursively; `count` of them evenly spread over the sorted list, so a
    class-per-folder dataset shows several classes."""
    paths = []
    for source in sources:
        if os.path.isdir(source):
            paths += sorted(os.path.join(d, f) for d, _, files in os.walk(source) for f in files
                            if f.lower().endswith(EXTENSIONS))
        elif os.path.isfile(source):
            paths.append(source)
        else:
            raise UserError(f'--images {source}: no such file or folder')
    if not paths:
        raise UserError(f'no .jpg/.jpeg/.png images under {" ".join(sources)}')
    paths = paths[::max(1, len(paths) // count)][:count]
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    repeated = sorted({s for s in stems if stems.count(s) > 1})
    if repeated:
        raise UserError(f'several images are named {repeated[0]}; their PNGs would overwrite each other, '
                        f'pass them separately')
    return paths


def panel_input(images, size):
    """uint8 [N, 3, size, size] of RGB PIL images: resized to size / 0.875 and centre-cropped, the geometry of
    evaluation."""
    prepare = transforms.Compose([*eval_geometry(size), transforms.PILToTensor()])
    return torch.stack([prepare(image) for image in images])


def load_images(paths, size):
    """panel_input of image files."""
    return panel_input([load_rgb(p) for p in paths], size)


def get_args_parser():
    parser = cli.make_parser('MILAN visualisation', __doc__)
    parser.add_argument('--checkpoint', required=True,
                        help='a pretraining checkpoint (kind "pretrain"), or a released MAE/MILAN/MMPretrain one')
    parser.add_argument('--clip_model', default=None,
                        help='teacher to use instead of the checkpoint\'s (name, TorchScript or state-dict file)')
    parser.add_argument('--clip_cache', default=None, help='where named CLIP models are downloaded')
    parser.add_argument('--images', nargs='+', default=None,
                        help='image files or folders (searched recursively); default: the demo val images')
    parser.add_argument('--num_images', type=int, default=8, help='images drawn, spread over the sorted list')
    parser.add_argument('--out_dir', required=True, help='one <image stem>.png per image')
    parser.add_argument('--mask_ratio', type=float, default=None, help='default: the checkpoint\'s')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the masks (each batch of images uses seed + its first image\'s index)')
    parser.add_argument('--zoom', type=int, default=1,
                        help=f'enlarge each panel this many times; panels are at least {READABLE} px whatever the '
                             f'zoom, so that labels fit')
    parser.add_argument('--batch_size', type=int, default=16, help='images per forward pass')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cuda or cpu')
    return parser


def main(args):
    check(args.num_images >= 1 and args.batch_size >= 1 and args.zoom >= 1,
          '--num_images, --batch_size and --zoom must be at least 1')
    check(args.mask_ratio is None or 0 < args.mask_ratio < 1, '--mask_ratio must be between 0 and 1 (exclusive)')
    model, ckpt_args, title = read_pretrain_checkpoint(args.checkpoint)
    teacher = checkpoint_teacher(model, ckpt_args, args.checkpoint, args.clip_model, args.clip_cache)
    mask_ratio = ckpt_args['mask_ratio'] if args.mask_ratio is None else args.mask_ratio
    check(model.num_visible(mask_ratio) >= 1, f'--mask_ratio {mask_ratio} leaves no visible patch')
    if (args.clip_model or ckpt_args['clip_model']) == 'random' and teacher is not None:
        log('the random teacher\'s attention, the masks drawn from it and the CLIP loss carry no meaning')
    device = torch.device(args.device)
    model.to(device)
    if teacher is not None:
        teacher.to(device)
    paths = image_paths(args.images or [os.path.join(ensure_demo_dataset(), 'val')], args.num_images)
    os.makedirs(args.out_dir, exist_ok=True)
    for start in range(0, len(paths), args.batch_size):
        batch = paths[start:start + args.batch_size]
        grids = panels(model, teacher, load_images(batch, ckpt_args['input_size']), mask_ratio, args.seed + start,
                       ckpt_args['teacher_input_norm'], args.zoom, ckpt_args['attn_mask'], title).grids
        for path, grid in zip(batch, grids):
            out = os.path.join(args.out_dir, os.path.splitext(os.path.basename(path))[0] + '.png')
            Image.fromarray(grid).save(out)
    log(f'{len(paths)} PNG file(s) in {args.out_dir} ({title}): image | mask | teacher attn / loss | student attn | '
        f'colour scale')


if __name__ == '__main__':
    cli.run(main, get_args_parser().parse_args())
