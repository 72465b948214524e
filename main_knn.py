"""Weighted k-NN classification of a frozen encoder (DINO's protocol: cosine similarity, k = 20, temperature 0.07):
top-1 and top-5 on val/ from train/'s features, written to knn.json. It takes any encoder checkpoint: ours
(pretrained or fine-tuned), the released MAE and MILAN files, MMPretrain's MILAN files. Without --data_path it
evaluates the demo pretraining checkpoint on the generated demo data."""
import json
import os

import engine_knn
import models_vit
from util import cli, config, runtime
from util.distributed import cleanup, is_main
from util.errors import check
from util.logger import log
from util.pretrained import load_pretrained, read_pretrained

DEMO_DEFAULTS = dict(model='vit_tiny_patch8', input_size=64, batch_size=64, num_workers=2,
                     checkpoint=config.DEMO_PRETRAIN, output_dir='./output_demo/knn')


def get_args_parser():
    parser = cli.make_parser('MILAN k-NN evaluation', __doc__, DEMO_DEFAULTS)
    cli.add_common_args(parser)
    cli.hide_from_help(parser, cli.TRAINING_FLAGS)
    parser.set_defaults(batch_size=128, output_dir='./output_dir', eval=True)  # evaluation only: no stop handler
    g = parser.add_argument_group('k-NN')
    g.add_argument('--checkpoint', default='', help='the encoder: any checkpoint --finetune reads')
    g.add_argument('--model', default='vit_base_patch16', choices=sorted(models_vit.MODELS),
                   help='the encoder\'s size (vit_tiny_patch8 is the demo\'s)')
    g.add_argument('--k', type=int, default=20, help='neighbours that vote')
    g.add_argument('--temperature', type=float, default=0.07, help='votes weighted by exp(cosine / temperature)')
    g.add_argument('--feature', default='cls', choices=['cls', 'mean'],
                   help='the final-normed class token, or the mean of the patch tokens (a fine-tuned checkpoint '
                        'with global pooling always gives its pooled feature)')
    g.add_argument('--train_subset', type=int, default=0, help='use this many train/ images, spread (0: all)')
    g.add_argument('--val_subset', type=int, default=0, help='use this many val/ images, spread (0: all)')
    return parser


def validate_args(args):
    cli.validate_common(args)
    check(bool(args.checkpoint), '--checkpoint CHECKPOINT is needed: the encoder to evaluate')
    check(os.path.isfile(args.checkpoint), f'--checkpoint {args.checkpoint}: no such file'
          + (' (run `python main_pretrain.py` first)' if args.checkpoint == config.DEMO_PRETRAIN else ''))
    check(args.k >= 1 and args.temperature > 0, '--k must be at least 1 and --temperature positive')


def build_encoder(args):
    """(the encoder on the CPU, images -> [B, D] features): a checkpoint that pools through fc_norm (fine-tuned
    with global pooling) gives that pooled feature; any other the final-normed class token or patch mean."""
    state = read_pretrained(args.checkpoint)  # read once: the keys choose the model, then it loads them
    pooled = 'fc_norm.weight' in state
    model = models_vit.create_model(args.model, args.input_size, num_classes=0, global_pool=pooled)
    load_pretrained(model, args.checkpoint, allowed_missing=(), state=state)
    model.eval()
    if pooled:
        return model, lambda x: model.forward_head(model.forward_features(x), pre_logits=True)
    if args.feature == 'mean':
        return model, lambda x: model.forward_features(x)[:, model.num_prefix_tokens:].mean(1)
    return model, lambda x: model.forward_features(x)[:, 0]


def main(args):
    validate_args(args)
    device = runtime.start(args)
    train_set, val_set, num_classes = engine_knn.knn_sets(args.data_path, args.input_size, args.train_subset,
                                                          args.val_subset)
    model, encode = build_encoder(args)
    model.to(device)
    stats = engine_knn.knn_evaluate(encode, train_set, val_set, num_classes, args.k, args.temperature,
                                    args.batch_size, args.num_workers, device, args.precision)
    log(f'k-NN (k={args.k}, T={args.temperature}) of {args.checkpoint} on {len(val_set)} val images against '
        f'{len(train_set)} train images: top-1 {stats["acc1"]:.2f}% top-5 {stats["acc5"]:.2f}%')
    if is_main() and args.output_dir:
        with open(os.path.join(args.output_dir, 'knn.json'), 'w') as f:
            json.dump({**stats, 'checkpoint': os.path.abspath(args.checkpoint), 'k': args.k,
                       'temperature': args.temperature, 'train_images': len(train_set),
                       'val_images': len(val_set)}, f, indent=2)
    cleanup()
    return stats


if __name__ == '__main__':
    cli.run(main, cli.parse_args(get_args_parser(), DEMO_DEFAULTS))
