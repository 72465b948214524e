"""Argument parsing and the way an entry point ends: one line for a user error, a checkpoint for a stop signal."""
import argparse
import os
import signal
import sys
import tempfile
import textwrap
import time

from util.config import settle_flags
from util.distributed import launch_rank, world_size
from util.errors import LocalError, UserError, check, one_line
from util.preemption import STOP


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default, except where there is none to show (None or '': the text says what
    happens then; a --no_x switch); descriptions keep their line breaks."""

    def _get_help_string(self, action):
        if action.default in (None, '') or action.const is False:
            return action.help
        return super()._get_help_string(action)


def _as_flags(defaults):
    return ' '.join(f'--{k}' if v is True else f'--no-{k}' if v is False else f'--{k} {v}' for k, v in defaults.items())


def make_parser(prog, description, demo_defaults=None):
    """An entry point's parser. Abbreviations are off: argparse would silently take `--epoch 3` as --epochs."""
    epilog = None
    if demo_defaults:
        epilog = textwrap.fill('Without --data_path the built-in CPU demo runs, with these defaults instead: '
                               + _as_flags(demo_defaults), 100, break_on_hyphens=False)
    return argparse.ArgumentParser(prog, description=description, epilog=epilog, formatter_class=HelpFormatter,
                                   allow_abbrev=False)


SILENT_EXIT_DELAY_S = 3
# The exit status of a run a stop signal ended after saving its checkpoint: the same command continues it.
# Distinct from 0 (finished), 1 (a crash), 2 (a usage or data error) and 130 (Ctrl-C), so that schedulers and
# scripts can tell "stopped, resumable" from "done".
EXIT_STOPPED = 3


def run(main, args, exit_when_stopped=True):
    """Run an entry point and return its result, ending the process the way a user can read:
    - a run a stop signal ended (after saving): exit code EXIT_STOPPED, unless `exit_when_stopped` is False
      (util.slurm's in-process job requeues it instead, from the result's 'completed': False);
    - a UserError: `error: ...` on stderr and exit code 2, printed once per run: by rank 0 (every process meets
      it alike), or by the process that met it in its own data (a LocalError, or one a loader worker raised);
    - Ctrl-C during a run that already stops, or where nothing checks for a stop: one line, exit code 130;
    - a run stopped by Ctrl-C (after saving): exit code 130, as shells expect, so that `a && b` stops too;
    - a collective that fails once a stop signal has arrived (torchrun stops the others when one process
      failed): one line naming that cause instead of the backend's traceback, exit code 1."""
    try:
        result = main(args)
    except UserError as e:
        local = isinstance(e, LocalError) or 'Original Traceback' in str(e)
        if launch_rank() == 0 or local:
            rank = f'[rank {launch_rank()}] ' if local and world_size() > 1 else ''
            print(f'error: {rank}{one_line(e)}', file=sys.stderr, flush=True)
        else:  # the launcher stops every process when one exits: let rank 0 print first
            time.sleep(SILENT_EXIT_DELAY_S)
        sys.exit(2)
    except KeyboardInterrupt:
        if launch_rank() == 0:
            print('error: interrupted: stopped without saving; checkpoints written before are intact',
                  file=sys.stderr, flush=True)
        sys.exit(130)
    except RuntimeError as e:
        if not (STOP.requested and world_size() > 1):
            raise
        print(f'error: [rank {launch_rank()}] lost the other processes after a stop signal (another process '
              f'failed, see its error, or was stopped): {one_line(e)}', file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        STOP.uninstall()
    if isinstance(result, dict) and not result.get('completed', True):  # (submit scripts return a job)
        if STOP.signal == signal.SIGINT:
            sys.exit(130)
        if exit_when_stopped:
            sys.exit(EXIT_STOPPED)
    return result


def add_common_args(parser):
    """Flags every entry point shares, with MAE's names; each script sets its own recipe defaults."""
    g = parser.add_argument_group('optimisation')
    g.add_argument('--batch_size', type=int, default=64, help='images per process per iteration')
    g.add_argument('--epochs', type=int, default=400, help='epochs to train')
    g.add_argument('--accum_iter', type=int, default=1,
                   help='gradient accumulation steps (effective batch = batch_size x accum_iter x processes)')
    g.add_argument('--input_size', type=int, default=224, help='image side in pixels')
    g.add_argument('--weight_decay', type=float, default=0.05,
                   help='decoupled weight decay (none on biases, norms and tokens)')
    g.add_argument('--lr', type=float, default=None, help='absolute lr; default blr x effective batch / 256')
    g.add_argument('--blr', type=float, default=1e-3, help='base lr for an effective batch of 256')
    g.add_argument('--min_lr', type=float, default=0.0, help='lr at the end of the cosine schedule')
    g.add_argument('--warmup_epochs', type=int, default=40,
                   help='epochs of linear lr warm-up before the cosine (clamped to --epochs unless given)')
    g.add_argument('--clip_grad', type=float, default=None, help='clip the gradient norm (off by default)')
    g.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None,
                   help='torch.compile each transformer block (default: on with CUDA, off on the CPU)')
    g.add_argument('--precision', default='auto', choices=['auto', 'bf16', 'fp16', 'fp32'],
                   help='auto: bf16 autocast on GPU, fp32 on CPU; fp16 adds loss scaling')

    g = parser.add_argument_group('data and output')
    g.add_argument('--data_path', default=None,
                   help='an ImageNet-layout folder (train/<class>/...), tar shards (a brace pattern, .tar files or a '
                        'folder of them) or, for pretraining, a folder of images; omit to run the built-in CPU demo')
    g.add_argument('--output_dir', default=None, help='checkpoints, log.txt, config.json')
    g.add_argument('--log_dir', default=None, help='TensorBoard events (default: output_dir)')
    g.add_argument('--num_workers', type=int, default=10,
                   help='data loader processes per training process (capped at the CPUs it may use unless given)')
    g.add_argument('--pin_mem', action=argparse.BooleanOptionalAction, default=True,
                   help='pin CPU memory for faster GPU copies')
    g.add_argument('--no_pin_mem', action='store_false', dest='pin_mem', help='MAE\'s spelling of --no-pin_mem')
    g.add_argument('--save_every', type=int, default=20, help='keep a numbered checkpoint every N epochs')
    g.add_argument('--save_every_min', type=float, default=30,
                   help='also checkpoint mid-epoch when this many minutes passed since the last save')
    g.add_argument('--keep_last', type=int, default=2, help='also keep the newest N numbered checkpoints')
    g.add_argument('--max_bad_frac', type=float, default=0.1,
                   help='unreadable training images are skipped and logged; past this fraction the run stops')
    g.add_argument('--print_freq', type=int, default=20, help='iterations between log lines')

    g = parser.add_argument_group('run')
    g.add_argument('--device', default='cuda' if _cuda() else 'cpu', help='cuda (one GPU per process) or cpu')
    g.add_argument('--seed', type=int, default=0, help='seeds data order, augmentations, masks and initialisation')
    g.add_argument('--resume', default='', help='checkpoint to resume; default: the newest in output_dir')
    g.add_argument('--start_epoch', type=int, default=0, help='first epoch when not resuming')
    g.add_argument('--dist_url', default='env://', help='process-group rendezvous (torchrun sets env://)')
    g.add_argument('--local_rank', '--local-rank', type=int, default=0,
                   help='set by `torch.distributed.launch`; torchrun uses LOCAL_RANK instead')
    return parser


# The shared flags that only training reads: an evaluation-only entry point (main_knn.py) hides them from --help.
TRAINING_FLAGS = ('epochs', 'accum_iter', 'weight_decay', 'lr', 'blr', 'min_lr', 'warmup_epochs', 'clip_grad',
                  'save_every', 'save_every_min', 'keep_last', 'max_bad_frac', 'print_freq', 'resume', 'start_epoch',
                  'log_dir')


def hide_from_help(parser, flags):
    """Leave `flags` accepted (scripts pass them to every entry point) but out of --help."""
    for action in parser._actions:
        if action.dest in flags:
            action.help = argparse.SUPPRESS


def _cuda():
    import torch
    return torch.cuda.is_available()


def parse_args(parser, demo_defaults, argv=None):
    """Parse argv; without --data_path the script runs its demo, whose defaults apply to every flag the
    user did not give. Defaults that depend on the machine or on other flags are resolved here."""
    known, _ = parser.parse_known_args(argv)
    if known.data_path is None:
        parser.set_defaults(**demo_defaults)
    given = given_flags(parser, argv)
    args = parser.parse_args(argv)
    settle_flags(args, given)
    return args


def given_flags(parser, argv=None):
    """The destinations of the flags argv sets: argparse fills in defaults only for what a namespace lacks."""
    unset = object()
    namespace = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_known_args(argv, namespace)
    return {dest for dest, value in vars(namespace).items() if value is not unset}


def check_output_dir(path, flag):
    """Create the folder and write a file into it now, so that a bad --output_dir is one line before anything
    is built, not a traceback at the first checkpoint."""
    if os.path.isfile(path):
        raise UserError(f'{flag} {path} is a file, not a folder; pass a folder path')
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except NotADirectoryError:
        raise UserError(f'{flag} {path} lies under a file, not a folder; pass another path') from None
    except OSError as e:
        raise UserError(f'{flag} {path} is not writable ({e.strerror}); pass a folder you can write to') from None


def validate_common(args):
    """Checks of the shared flags, before anything is built."""
    check(args.epochs >= 1, f'--epochs must be at least 1, got {args.epochs}')
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
    for flag in ('output_dir', 'log_dir'):
        if getattr(args, flag):
            check_output_dir(getattr(args, flag), f'--{flag}')


def bool_flag(parser, name, help):
    """--name / --no-name, so demo defaults that turn a flag on can be turned off again."""
    parser.add_argument(f'--{name}', action=argparse.BooleanOptionalAction, default=False, help=help)
