"""Linear probing: a BatchNorm (no affine) and a linear head on the frozen pretrained encoder's feature,
trained with LARS. Without --data_path it probes the demo pretraining checkpoint on the generated data."""
if __name__ == '__main__':  # first of all: a stop signal during the imports below then ends the run with a line
    from util.preemption import STOP
    STOP.install(early=True)

import torch
from timm.layers import trunc_normal_

import main_classification as classification
import models_vit
from main_classification import add_classification_args, run
from util import cli
from util.data import linprobe_transform
from util.lars import LARS
from util.pretrained import load_pretrained

KIND = 'linprobe'
DEMO_DEFAULTS = dict(model='vit_tiny_patch8', input_size=64, batch_size=32, epochs=10, warmup_epochs=1, blr=50.0,
                     nb_classes=4, num_workers=2, print_freq=4, save_every=5, output_dir='./output_demo/linprobe')


# submitit checks the flags before queueing; the probe has no flags beyond the shared ones
validate_args = classification.validate_args


def get_args_parser():
    parser = cli.make_parser('MILAN linear probing', __doc__, DEMO_DEFAULTS)
    add_classification_args(parser, models_vit.MODELS)
    parser.set_defaults(batch_size=512, epochs=100, blr=0.05, warmup_epochs=10, weight_decay=0.0, global_pool=False,
                        output_dir='./output_dir')
    return parser


def build_model(args):
    """Load the encoder, put the BatchNorm in front of a freshly initialised head, freeze everything else."""
    model = models_vit.create_model(args.model, args.input_size, args.nb_classes, args.global_pool)
    if args.finetune:
        new = {'head.weight', 'head.bias'} | ({'fc_norm.weight', 'fc_norm.bias'} if args.global_pool else set())
        load_pretrained(model, args.finetune, new)
    trunc_normal_(model.head.weight, std=0.01)
    torch.nn.init.zeros_(model.head.bias)
    model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    return model


def build_optimizer(args, model):
    return LARS(model.head.parameters(), lr=args.lr, weight_decay=args.weight_decay)


def main(args):
    return run(args, KIND, build_model, build_optimizer, linprobe_transform(args.input_size),
               torch.nn.CrossEntropyLoss())


if __name__ == '__main__':
    cli.run(main, cli.parse_args(get_args_parser(), DEMO_DEFAULTS))
