"""Checkpoint utilities: `summary` (what a checkpoint holds), `export-timm` (the encoder or classifier as a
plain timm state dict), `import-mae` (a released MAE/MILAN pretraining file as our pretraining checkpoint).

    python -m tools.checkpoint_tools summary CKPT
    python tools/checkpoint_tools.py export-timm CKPT OUT.pth
    python tools/checkpoint_tools.py import-mae RELEASED.pth OUT.pth

Model sizes are read off the tensors (embedding width, depth, patch size, position table), so released
files without args work too, MMPretrain's included (MMEngine files: `backbone.*`, the decoder `neck.*`).
timm's create_model(..., checkpoint_path=OUT) loads strictly, so an exported pretraining encoder has no head
and loads with num_classes=0; export-timm prints the exact call.
"""
import argparse
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python tools/checkpoint_tools.py`: make the repository's modules importable
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

import models_milan  # noqa: E402
import models_vit  # noqa: E402
from util.checkpoint import save_atomic  # noqa: E402
from util.config import plain  # noqa: E402
from util.cli import add_common_args, make_parser, run  # noqa: E402
from util.clip_weights import carries_clip_teacher  # noqa: E402
from util.errors import UserError  # noqa: E402
from util.pretrained import (checkpoint_epoch, is_mmpretrain, model_state, read_checkpoint,  # noqa: E402
                             stored_state)

OUR_KINDS = ('pretrain', 'finetune', 'linprobe')
ENCODER = ('cls_token', 'pos_embed', 'patch_embed', 'blocks', 'norm')
DECODER = ('decoder_', 'mask_token')
BATCHNORM_STATS = ('running_mean', 'running_var', 'num_batches_tracked')
# timm's registered names for our sizes; the tiny demo size has no timm name.
TIMM_NAMES = {'vit_small_patch16': 'vit_small_patch16_224', 'vit_base_patch16': 'vit_base_patch16_224',
              'vit_large_patch16': 'vit_large_patch16_224', 'vit_huge_patch14': 'vit_huge_patch14_224'}
KEY_ARGS = ('use_clip', 'change_decoder', 'attn_mask', 'mask_ratio', 'norm_pix_loss', 'clip_model', 'teacher_weights',
            'teacher_input_size', 'blr', 'lr', 'batch_size', 'accum_iter', 'epochs', 'global_pool', 'nb_classes',
            'finetune')


def saved_args(ckpt):
    """The run's flags as a dict, whether saved as our plain dict or as a released file's Namespace."""
    args = ckpt.get('args')
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return args if isinstance(args, dict) else {}


def infer_size(state, path):
    """(models_vit name, input size) of the encoder in `state`, from its tensor shapes."""
    weight = state.get('patch_embed.proj.weight')
    if weight is None or 'pos_embed' not in state:
        raise UserError(f'{path} holds no ViT encoder (no patch_embed.proj.weight / pos_embed)')
    dim, patch = weight.shape[0], weight.shape[-1]
    depth = len({k.split('.')[1] for k in state if k.startswith('blocks.')})
    for name, cfg in models_vit.MODELS.items():
        if (cfg['embed_dim'], cfg['depth'], cfg['patch_size']) == (dim, depth, patch):
            break
    else:
        raise UserError(f'{path} holds a ViT with {dim}-d tokens, {depth} blocks and {patch}px patches, none of '
                        f'the sizes this repository knows ({", ".join(models_vit.MODELS)})')
    grid = math.isqrt(state['pos_embed'].shape[1] - 1)
    return name, grid * patch


def parameter_counts(state):
    """(encoder, total) trainable parameters: the fixed sin-cos position tables of pretraining and BatchNorm
    statistics are not parameters; 'encoder' leaves out the decoder and the classifier head."""
    fixed = set() if any(k.startswith('head') for k in state) else {'pos_embed', 'decoder_pos_embed'}
    counted = {k: v.numel() for k, v in state.items() if k not in fixed and not k.endswith(BATCHNORM_STATS)}
    encoder = sum(n for k, n in counted.items() if not k.startswith(DECODER + ('head',)))
    return encoder, sum(counted.values())


def released_mmpretrain(ckpt):
    """(whether a released file is in MMPretrain's layout, whether it carries its CLIP teacher as MMPretrain's MILAN
    files do), from the state dict model_state reads."""
    state = stored_state(ckpt)
    return is_mmpretrain(state), carries_clip_teacher(state)


def released_layout(ckpt):
    """Whose layout a released file has, for the summary: MMPretrain's (an MMEngine file) or MAE's."""
    return 'MMPretrain' if released_mmpretrain(ckpt)[0] else 'MAE/MILAN'


def summary(args):
    ckpt = read_checkpoint(args.checkpoint)
    state = model_state(ckpt, args.checkpoint)
    saved = saved_args(ckpt)
    size, input_size = infer_size(state, args.checkpoint)
    has_decoder = any(k.startswith(DECODER) for k in state)
    kind = ckpt.get('kind') or (f'released {released_layout(ckpt)} pretraining file' if has_decoder else
                                'released encoder' + (' with a head' if 'head.weight' in state else ''))
    name = saved.get('model') or (f'mae_{size}' if has_decoder else size) + ' (read off the weights)'
    encoder, total = parameter_counts(state)
    epoch = checkpoint_epoch(ckpt)
    print(f'checkpoint: {args.checkpoint}')
    print(f'kind: {kind}')
    print(f'model: {name}')
    print(f'epoch: {"-" if epoch is None else epoch}')
    print(f'input size: {input_size}')
    print(f'parameters: encoder {encoder:,} / total {total:,}')
    key_args = [f'{k}={saved[k]}' for k in KEY_ARGS if k in saved]
    print(f'args: {" ".join(key_args) or "-"}')
    if 'best_acc1' in ckpt:
        print(f'best_acc1: {ckpt["best_acc1"]:.2f}')


def _compare(state, expected, what):
    """Refuse, naming a few keys, when `state` is not exactly `expected` (key set and shapes)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f'{k} {tuple(state[k].shape)} vs {tuple(v.shape)}' for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f'{label}: {", ".join(items[:4])}{" ..." if len(items) > 4 else ""}'
                 for label, items in (('missing', missing), ('unexpected', unexpected), ('shape', shapes)) if items]
        raise UserError(f'the weights do not match {what} ({"; ".join(parts)})')


def check_out_folder(out):
    """Before any work: the folder the output goes to must exist."""
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise UserError(f'cannot write {out}: there is no folder {folder}; create it first')


def export_timm(args):
    check_out_folder(args.out)
    ckpt = read_checkpoint(args.checkpoint)
    state = model_state(ckpt, args.checkpoint)
    if ckpt.get('kind') == 'linprobe' or 'head.1.weight' in state:
        source = saved_args(ckpt).get('finetune') or 'its pretraining checkpoint'
        raise UserError(f'{args.checkpoint} is a linear probe: its BatchNorm + linear head has no timm equivalent; '
                        f'export the encoder from {source} instead')
    size, input_size = infer_size(state, args.checkpoint)
    if args.model and args.model.removeprefix('mae_') != size:
        raise UserError(f'{args.checkpoint} holds a {size} encoder, not --model {args.model}; drop --model')
    if 'head.weight' in state:
        kwargs = dict(num_classes=state['head.weight'].shape[0],
                      global_pool='avg' if 'fc_norm.weight' in state else 'token')
    else:  # pretraining: the encoder alone, for a timm model built without a head
        state = {k: v for k, v in state.items() if k.split('.')[0] in ENCODER}
        kwargs = dict(num_classes=0, global_pool='token')
    with torch.device('meta'):  # only the key names and shapes are needed
        reference = VisionTransformer(img_size=input_size, **models_vit.MODELS[size], **kwargs).state_dict()
    _compare(state, reference, f'timm\'s VisionTransformer for {size}')
    save_atomic({k: v.contiguous() for k, v in state.items()}, args.out)

    options = [f'num_classes={kwargs["num_classes"]}']
    options += ["global_pool='avg'"] if kwargs['global_pool'] == 'avg' else []
    if size in TIMM_NAMES:
        options += [f'img_size={input_size}'] if input_size != 224 else []
        load = [f'model = timm.create_model({TIMM_NAMES[size]!r}, pretrained=False, checkpoint_path={args.out!r}, '
                f'{", ".join(options)})']
    else:  # no registered timm name: build the class with the same sizes
        cfg = ', '.join(f'{k}={v}' for k, v in models_vit.MODELS[size].items())
        load = [f'model = timm.models.VisionTransformer(img_size={input_size}, {cfg}, {", ".join(options)})',
                f'timm.models.load_checkpoint(model, {args.out!r})']
    print(f'wrote {len(state)} tensors of {args.checkpoint} ({size}, '
          f'{"classifier" if kwargs["num_classes"] else "encoder without head"}) to {args.out}; load it with:')
    for line in load:
        print(f'    {line}')


def released_pretraining(ckpt, path):
    """(our MilanViT with the weights, the flags to save with it) of a released MAE/MILAN pretraining file, in MAE's
    layout or MMPretrain's. The sizes are read off the tensors, the decoder type off its keys; what a file without
    args doesn't say is guessed: the CLIP target when the head is not pixel-sized, MILAN's semantic-aware masking
    with the prompting decoder and that target (MMPretrain's MILAN files, which keep no args; a file that carries its
    CLIP teacher has the CLIP target) and normalised pixels for MMPretrain's MAE, as its configs train it."""
    state = model_state(ckpt, path)
    size, input_size = infer_size(state, path)
    if not any(k.startswith(DECODER) for k in state):
        raise UserError(f'{path} holds an encoder without decoder (a release for fine-tuning): '
                        f'pass it to main_finetune.py --finetune as it is')
    released = saved_args(ckpt)
    mmpretrain, own_teacher = released_mmpretrain(ckpt)
    name = f'mae_{size}'
    patch = models_vit.MODELS[size]['patch_size']
    target_dim = state['decoder_pred.weight'].shape[0] if 'decoder_pred.weight' in state else 0
    # Without args a CLIP head of p*p*3 outputs can't be told from a pixel head: pixels (MAE) is assumed.
    use_clip = bool(released.get('use_clip', target_dim != patch * patch * 3 or own_teacher))
    prompting = 'decoder_blocks.0.attn.q.weight' in state
    # MMPretrain trains its pixel MAE on normalised patches (MAEPretrainHead(norm_pix=True) in its configs)
    norm_pix = bool(released.get('norm_pix_loss', mmpretrain and not use_clip))
    model = models_milan.create_model(name, img_size=input_size, target='clip' if use_clip else 'pixel',
                                      target_dim=target_dim, prompting_decoder=prompting,
                                      norm_pix_loss=norm_pix)
    _compare(state, model.state_dict(), f'our {name} ({"CLIP" if use_clip else "pixel"} target, '
                                        f'{"prompting" if prompting else "MAE"} decoder)')
    model.load_state_dict(state)

    ours = set(models_milan.FLAG_DEFAULTS) | {a.dest for a in add_common_args(argparse.ArgumentParser())._actions}
    mapped = {k: v for k, v in released.items() if k in ours}  # the flags of theirs that we share
    mapped.setdefault('attn_mask', use_clip and prompting)
    mapped.setdefault('norm_pix_loss', norm_pix)
    mapped.update(model=name, input_size=input_size, use_clip=use_clip, change_decoder=prompting,
                  imported_from=os.path.abspath(path))
    return model, mapped


def import_mae(args):
    check_out_folder(args.out)
    ckpt = read_checkpoint(args.checkpoint)
    if ckpt.get('kind') in OUR_KINDS:
        raise UserError(f'{args.checkpoint} is already a {ckpt["kind"]} checkpoint of this repository')
    model, mapped = released_pretraining(ckpt, args.checkpoint)
    epoch = checkpoint_epoch(ckpt)
    save_atomic({'kind': 'pretrain', 'model': model.state_dict(), 'epoch': epoch,
                 'args': plain(argparse.Namespace(**mapped))}, args.out)
    print(f'wrote {args.out}: {mapped["model"]} at {mapped["input_size"]}px, '
          f'{"CLIP" if mapped["use_clip"] else "pixel"} target, {"prompting" if mapped["change_decoder"] else "MAE"} '
          f'decoder, epoch {"?" if epoch is None else epoch}; weights only (no optimizer state, so it cannot be '
          f'resumed): use it with main_finetune.py --finetune or visualize.py --checkpoint')


def get_args_parser():
    parser = make_parser('checkpoint_tools', __doc__)
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('summary', help='kind, model, epoch, input size, parameter count and key flags')
    p.add_argument('checkpoint', help='any checkpoint of this repository, or a released MAE/MILAN file')
    p.set_defaults(func=summary)
    p = sub.add_parser('export-timm', help='the encoder (pretraining) or classifier (fine-tuning) as a timm state dict')
    p.add_argument('checkpoint', help='a pretraining or fine-tuning checkpoint of this repository')
    p.add_argument('out', help='the timm state dict to write')
    p.add_argument('--model', default=None,
                   help='optional check of the size (e.g. vit_base_patch16); it is read off the weights anyway')
    p.set_defaults(func=export_timm)
    p = sub.add_parser('import-mae', help='a released MAE/MILAN pretraining file as our pretraining checkpoint')
    p.add_argument('checkpoint', help='a released MAE or MILAN pretraining file (MAE\'s or MMPretrain\'s layout)')
    p.add_argument('out', help='the pretraining checkpoint to write')
    p.set_defaults(func=import_mae)
    return parser


if __name__ == '__main__':
    parsed = get_args_parser().parse_args()
    run(parsed.func, parsed)
