"""A run's configuration, settled in one place and recorded in one place. Flags whose value depends on other flags
or on the machine are settled here: at parse time (`settle_flags`, called by util.cli.parse_args) and once the
device and process group exist (`settle_for_device`, called by util.runtime.start). `plain` is the configuration
as config.json and checkpoints record it. Beyond this module only the launch's own facts are written into the
flags: rank and world size (util.distributed) and SLURM's absolute paths (util.slurm)."""
import os

from util.distributed import local_processes, world_size
from util.logger import log
from util.precision import resolve_precision

# main_pretrain's demo checkpoint, which the fine-tuning and probing demos start from
DEMO_PRETRAIN = './output_demo/pretrain/checkpoint-last.pth'
# files that a resumed run compares by path, whatever relative path named them
PATH_FLAGS = ('clip_model', 'teacher_weights', 'finetune')


def cache_dir(name: str) -> str:
    """~/.cache/<name>, honouring $XDG_CACHE_HOME (where openai-clip and most tools keep downloads)."""
    return os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'), name)


def demo_data_root() -> str:
    """Where util.demo_data generates the demo's images."""
    return os.path.join(cache_dir('milan'), 'demo_data')


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which schedulers and containers set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def cpus_per_process() -> int:
    """This process's share of the CPUs, when every training process on the machine gets the same."""
    return available_cpus() // local_processes()


def settle_flags(args, given: set) -> None:
    """What follows from the flags alone (`given`: the flags the user set): the demo (no --data_path) and its
    data, the log folder, loader workers capped at this process's CPUs, a default warm-up that would outlast
    the run."""
    args.demo = args.data_path is None
    if args.demo:
        args.data_path = demo_data_root()
    args.log_dir = args.log_dir or args.output_dir
    if 'num_workers' not in given:  # the DataLoader warns about more workers than CPUs
        args.num_workers = min(args.num_workers, max(1, cpus_per_process()))
    if 'warmup_epochs' not in given and 1 <= args.epochs < args.warmup_epochs:
        log(f'warning: the default --warmup_epochs {args.warmup_epochs} exceeds --epochs {args.epochs}: warming up '
            f'for all {args.epochs} instead; pass --warmup_epochs to choose')
        args.warmup_epochs = args.epochs
    if args.demo and getattr(args, 'finetune', None) == '' and not getattr(args, 'eval', False):
        if os.path.isfile(DEMO_PRETRAIN):
            args.finetune = DEMO_PRETRAIN
        else:
            log(f'no {DEMO_PRETRAIN} (run `python main_pretrain.py` first): training from random initialisation')
    if getattr(args, 'teacher_input_size', 0) is None and args.use_clip:  # a teacher sees the student's size
        args.teacher_input_size = args.input_size
    for flag in PATH_FLAGS:
        if os.path.isfile(getattr(args, flag, None) or ''):
            setattr(args, flag, os.path.abspath(getattr(args, flag)))


def settle_for_device(args, device) -> None:
    """What follows from the device and the process group: the precision ('auto': bf16 on CUDA), --compile (on
    by default on CUDA), the lr from the effective batch unless --lr was given (logged with the batch)."""
    args.precision = resolve_precision(args.precision, device)
    if getattr(args, 'compile', False) is None:
        args.compile = device.type == 'cuda'
    eff_batch = args.batch_size * args.accum_iter * world_size()
    if args.lr is None:
        args.lr = args.blr * eff_batch / 256
    log(f'effective batch {eff_batch} = {args.batch_size} x {args.accum_iter} accumulation x {world_size()} '
        f'processes; lr {args.lr:.3e} (blr {args.blr:.3e}); precision {args.precision}')


def plain(args) -> dict:
    """The run's configuration as a dict of plain values, safe to store in a checkpoint."""
    ok = (str, int, float, bool, type(None))
    out = {}
    for key, value in vars(args).items():
        if isinstance(value, ok) or (isinstance(value, (list, tuple)) and all(isinstance(v, ok) for v in value)):
            out[key] = list(value) if isinstance(value, tuple) else value
    return out
