"""Argument parsing and one-line error reporting shared by the entry points."""
import argparse
import os
import sys


class UserError(Exception):
    """A problem the user can fix (bad path, bad flag, bad file); printed as one line, no traceback."""


def one_line(exc):
    """The user-facing line of a UserError, also when a DataLoader worker re-raised it with its traceback."""
    msg = str(exc).strip()
    if 'Original Traceback' in msg:
        msg = msg.splitlines()[-1].split(': ', 1)[-1]
    return msg.splitlines()[0] if msg else type(exc).__name__


def run(main, args):
    """Run an entry point and return its result; a UserError ends the process with `error: ...` on stderr
    and exit code 2."""
    try:
        return main(args)
    except UserError as e:
        print(f'error: {one_line(e)}', file=sys.stderr, flush=True)
        sys.exit(2)


def add_common_args(parser):
    """Flags every entry point shares, with MAE's names; each script sets its own recipe defaults."""
    g = parser.add_argument_group('optimisation')
    g.add_argument('--batch_size', type=int, default=64, help='images per process per iteration')
    g.add_argument('--epochs', type=int, default=400)
    g.add_argument('--accum_iter', type=int, default=1,
                   help='gradient accumulation steps (effective batch = batch_size x accum_iter x processes)')
    g.add_argument('--input_size', type=int, default=224)
    g.add_argument('--weight_decay', type=float, default=0.05)
    g.add_argument('--lr', type=float, default=None, help='absolute lr; default blr x effective batch / 256')
    g.add_argument('--blr', type=float, default=1e-3, help='base lr for an effective batch of 256')
    g.add_argument('--min_lr', type=float, default=0.0, help='lr at the end of the cosine schedule')
    g.add_argument('--warmup_epochs', type=int, default=40)
    g.add_argument('--clip_grad', type=float, default=None, help='clip the gradient norm (off by default)')
    g.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None,
                   help='torch.compile each transformer block (default: on with CUDA, off on the CPU)')
    g.add_argument('--precision', default='auto', choices=['auto', 'bf16', 'fp16', 'fp32'],
                   help='auto: bf16 autocast on GPU, fp32 on CPU; fp16 adds loss scaling')

    g = parser.add_argument_group('data and output')
    g.add_argument('--data_path', default=None,
                   help='ImageNet-layout folder (train/<class>/...); omit to run the built-in CPU demo')
    g.add_argument('--output_dir', default=None, help='checkpoints, log.txt, config.json')
    g.add_argument('--log_dir', default=None, help='TensorBoard events (default: output_dir)')
    g.add_argument('--num_workers', type=int, default=10)
    g.add_argument('--pin_mem', action='store_true', default=True, help='pin CPU memory for faster GPU copies')
    g.add_argument('--no_pin_mem', action='store_false', dest='pin_mem')
    g.add_argument('--save_every', type=int, default=20, help='keep a numbered checkpoint every N epochs')
    g.add_argument('--save_every_min', type=float, default=30,
                   help='also checkpoint mid-epoch when this many minutes passed since the last save')
    g.add_argument('--keep_last', type=int, default=2, help='also keep the newest N numbered checkpoints')
    g.add_argument('--max_bad_frac', type=float, default=0.1,
                   help='unreadable training images are skipped and logged; past this fraction the run stops')
    g.add_argument('--print_freq', type=int, default=20, help='iterations between log lines')

    g = parser.add_argument_group('run')
    g.add_argument('--device', default='cuda' if _cuda() else 'cpu')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--resume', default='', help='checkpoint to resume; default: the newest in output_dir')
    g.add_argument('--start_epoch', type=int, default=0, help='first epoch when not resuming')
    g.add_argument('--dist_url', default='env://', help='process-group rendezvous (torchrun sets env://)')
    g.add_argument('--local_rank', '--local-rank', type=int, default=0,
                   help='set by `torch.distributed.launch`; torchrun uses LOCAL_RANK instead')
    return parser


def cache_dir(name):
    """~/.cache/<name>, honouring $XDG_CACHE_HOME (where openai-clip and most tools keep downloads)."""
    return os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'), name)


def _cuda():
    import torch
    return torch.cuda.is_available()


def parse_args(parser, demo_defaults, argv=None):
    """Parse argv; without --data_path the script runs its demo, whose defaults apply to every flag the
    user did not give."""
    known, _ = parser.parse_known_args(argv)
    if known.data_path is None:
        parser.set_defaults(**demo_defaults)
    args = parser.parse_args(argv)
    args.demo = args.data_path is None
    args.log_dir = args.log_dir or args.output_dir
    return args


def validate_common(args):
    """Checks of the shared flags, before anything is built."""
    check(args.batch_size >= 1 and args.accum_iter >= 1, '--batch_size and --accum_iter must be at least 1')
    check(0 <= args.warmup_epochs <= args.epochs,
          f'--warmup_epochs {args.warmup_epochs} must be between 0 and --epochs {args.epochs}; lower it')
    check(min(args.save_every, args.print_freq, args.keep_last) >= 1,
          '--save_every, --keep_last and --print_freq must be at least 1')
    check(args.save_every_min > 0, f'--save_every_min must be positive, got {args.save_every_min}')
    check(0 <= args.max_bad_frac < 1, f'--max_bad_frac must be in [0, 1), got {args.max_bad_frac}')
    check(not args.resume or os.path.isfile(args.resume), f'--resume {args.resume}: no such file')
    check(args.num_workers >= 0, f'--num_workers must be 0 or more, got {args.num_workers}')
    check(args.blr > 0 and (args.lr is None or args.lr > 0) and args.min_lr >= 0,
          '--blr and --lr must be positive and --min_lr not negative')
    check(args.weight_decay >= 0, f'--weight_decay must not be negative, got {args.weight_decay}')
    check(args.clip_grad is None or args.clip_grad > 0, f'--clip_grad must be positive, got {args.clip_grad}')


def check(condition, message):
    """Raise a UserError with `message` unless `condition` holds."""
    if not condition:
        raise UserError(message)


def bool_flag(parser, name, help):
    """--name / --no-name, so demo defaults that turn a flag on can be turned off again."""
    parser.add_argument(f'--{name}', action=argparse.BooleanOptionalAction, default=False, help=help)
