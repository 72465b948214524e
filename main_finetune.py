"""Fine-tune a pretrained MILAN/MAE encoder for image classification (layer-wise lr decay, RandAugment,
mixup/cutmix, label smoothing, drop path). Without --data_path it fine-tunes on the generated demo data."""
if __name__ == '__main__':  # first of all: a stop signal during the imports below then ends the run with a line
    from util.preemption import STOP
    STOP.install(early=True)

from timm.data import Mixup
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

import main_classification as classification
import models_vit
from main_classification import add_classification_args, run
from util import cli
from util.errors import check
from util.data import finetune_transform
from util.lr_decay import param_groups_layer_decay
from util.optim import adamw
from util.pretrained import load_pretrained

KIND = 'finetune'
DEMO_DEFAULTS = dict(model='vit_tiny_patch8', input_size=64, batch_size=32, epochs=10, warmup_epochs=1, blr=2e-3,
                     layer_decay=0.75, drop_path=0.0, mixup=0.0, cutmix=0.0, nb_classes=4, num_workers=2,
                     print_freq=4, save_every=5, output_dir='./output_demo/finetune')


def get_args_parser():
    parser = cli.make_parser('MILAN fine-tuning', __doc__, DEMO_DEFAULTS)
    add_classification_args(parser, models_vit.MODELS)
    parser.set_defaults(batch_size=128, epochs=100, blr=1e-4, warmup_epochs=5, weight_decay=0.05, global_pool=True,
                        output_dir='./output_dir')
    g = parser.add_argument_group('fine-tuning')
    g.add_argument('--layer_decay', type=float, default=0.65, help='layer-wise lr decay')
    g.add_argument('--drop_path', type=float, default=0.1, help='stochastic depth rate')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    g.add_argument('--aa', default='rand-m9-mstd0.5-inc1', help='timm RandAugment policy ("" for none)')
    g.add_argument('--reprob', type=float, default=0.25, help='random erasing probability')
    g.add_argument('--remode', default='pixel', help='random erasing fill (timm): pixel, rand or const')
    g.add_argument('--recount', type=int, default=1, help='random erasing regions per image')
    g.add_argument('--mixup', type=float, default=0.8, help='mixup alpha (0: off)')
    g.add_argument('--cutmix', type=float, default=1.0, help='cutmix alpha (0: off)')
    g.add_argument('--cutmix_minmax', type=float, nargs=2, default=None,
                   help='cutmix box size range as fractions of the image (overrides --cutmix alpha)')
    g.add_argument('--mixup_prob', type=float, default=1.0, help='probability of mixup or cutmix per batch')
    g.add_argument('--mixup_switch_prob', type=float, default=0.5,
                   help='probability of cutmix instead of mixup when both are on')
    g.add_argument('--mixup_mode', default='batch', choices=['batch', 'pair', 'elem'],
                   help='mix parameters drawn per batch, per pair or per image')
    return parser


def build_model(args):
    model = models_vit.create_model(args.model, args.input_size, args.nb_classes, args.global_pool, args.drop_path)
    if args.finetune:
        new = {'head.weight', 'head.bias'} | ({'fc_norm.weight', 'fc_norm.bias'} if args.global_pool else set())
        load_pretrained(model, args.finetune, new)
    trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)
    return model


def build_optimizer(args, model):
    groups = param_groups_layer_decay(model, args.weight_decay, args.layer_decay)
    return adamw(groups, args.lr, (0.9, 0.999), next(model.parameters()).device)


def build_criterion(args):
    """(loss, mixup/cutmix or None): soft-target cross-entropy under mixup/cutmix (which smooths the labels
    itself), else label smoothing when --smoothing, else plain cross-entropy."""
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        check(args.batch_size % 2 == 0, f'mixup/cutmix pair images: --batch_size {args.batch_size} must be even')
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                      prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                      label_smoothing=args.smoothing, num_classes=args.nb_classes)
        return SoftTargetCrossEntropy(), mixup
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(args.smoothing), None
    return nn.CrossEntropyLoss(), None


def train_transform(args):
    return finetune_transform(args.input_size, args.aa or None, args.reprob, args.remode, args.recount)


def validate_args(args):
    """The shared checks, and the fine-tuning flags that would otherwise fail deep in training or be
    silently meaningless."""
    classification.validate_args(args)
    for flag in ('drop_path', 'smoothing'):
        check(0 <= getattr(args, flag) < 1, f'--{flag} must be in [0, 1), got {getattr(args, flag)}')
    for flag in ('reprob', 'mixup_prob', 'mixup_switch_prob'):
        check(0 <= getattr(args, flag) <= 1, f'--{flag} is a probability, got {getattr(args, flag)}')
    check(args.mixup >= 0 and args.cutmix >= 0, '--mixup and --cutmix alphas must not be negative (0: off)')
    check(0 < args.layer_decay <= 1, f'--layer_decay must be in (0, 1], got {args.layer_decay}')


def main(args):
    validate_args(args)
    criterion, mixup = build_criterion(args)
    return run(args, KIND, build_model, build_optimizer, train_transform(args), criterion, mixup)


if __name__ == '__main__':
    cli.run(main, cli.parse_args(get_args_parser(), DEMO_DEFAULTS))
