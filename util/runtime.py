"""Run setup shared by the entry points: processes and device, the configuration settled for them
(util.config), seeds, output folder, demo data, compiling blocks and DDP wrapping."""
import inspect
import os
import platform
import signal
import subprocess

import numpy as np
import timm
import torch
import torchvision
from torch.nn.parallel import DistributedDataParallel

from util.atomic import remove_stale_temporaries
from util.config import cpus_per_process, plain, settle_for_device
from util.demo_data import ensure_demo_dataset
from util.distributed import init_distributed
from util.logger import RunLogger, log
from util.precision import grad_scaler
from util.preemption import STOP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(args):
    """Initialise the process group and everything global; returns the device. A training run handles the stop
    signals from here on, so a stop during start-up ends it with a line rather than silently."""
    if not getattr(args, 'eval', False):
        STOP.install()
    elif STOP.installed:  # evaluating only: nothing to save, so the stop signals act as they would by default
        pending = STOP.signal
        STOP.uninstall()
        if pending is not None:
            signal.raise_signal(pending)
    device = init_distributed(args)
    settle_for_device(args, device)
    if device.type == 'cpu' and 'OMP_NUM_THREADS' not in os.environ:
        # Training threads and loader workers share the cores: all of them for each would oversubscribe.
        torch.set_num_threads(max(1, cpus_per_process() - args.num_workers))
    torch.manual_seed(args.seed + args.rank)
    np.random.seed(args.seed + args.rank)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        stale = remove_stale_temporaries(args.output_dir)
        if stale:
            log(f'removed {len(stale)} temporary file(s) that killed writes left in {args.output_dir}')
    if args.demo:
        ensure_demo_dataset(args.data_path)
        log(f'demo run on generated images in {args.data_path} (pass --data_path for real data)')
    return device


def compile_blocks(args, *block_lists):
    """torch.compile every transformer block in place when --compile (util.config: on by default on CUDA). Per block
    rather than the whole model: one small graph reused by every block, and state-dict keys unchanged. Shapes are
    static (the kept-patch count is fixed): without dynamic=False, the MAE decoder's blocks, the encoder's class
    at another sequence length, would turn the encoder's graph into a slower dynamic-shape one."""
    if args.compile:
        for blocks in block_lists:
            for block in blocks:
                block.compile(dynamic=False)


def prepare_training(args, model, device, build_optimizer):
    """(the model wrapped for DDP, its optimizer, the gradient scaler)."""
    return wrap_ddp(model, device, args), build_optimizer(args, model), grad_scaler(args.precision, device)


# torch 2.14 renamed DDP's per-forward buffer broadcast to forward_sync_buffers (broadcast_buffers is deprecated
# there); older releases only know broadcast_buffers.
_NO_BUFFER_SYNC = ({'forward_sync_buffers': False}
                   if 'forward_sync_buffers' in inspect.signature(DistributedDataParallel.__init__).parameters
                   else {'broadcast_buffers': False})


def wrap_ddp(model, device, args):
    """DDP across processes. Buffers are not re-broadcast every forward: the position tables are fixed, and
    a probe's BatchNorm statistics are synchronised once before each evaluation (main_classification.run)."""
    if not args.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None,
                                   **_NO_BUFFER_SYNC)


def software():
    """What produced a run, for config.json: the repository's git commit (with '-dirty' for uncommitted changes;
    None outside a checkout) and the versions of the packages whose numbers it depends on."""
    try:
        commit = subprocess.run(['git', 'describe', '--always', '--dirty', '--abbrev=40'], cwd=ROOT, text=True,
                                capture_output=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {'git_commit': commit, 'python': platform.python_version(), 'torch': torch.__version__,
            'torchvision': torchvision.__version__, 'timm': timm.__version__, 'numpy': np.__version__,
            'cuda': torch.version.cuda}


def open_logger(args, start_epoch):
    """Write and print the resolved configuration (config.json also records the software); say so when a
    resumed run has nothing left to train."""
    logger = RunLogger(args.output_dir, args.log_dir, start_epoch)
    config = plain(args)
    logger.config({**config, 'software': software()})
    log('config: ' + ' '.join(f'{k}={v}' for k, v in sorted(config.items())))
    if start_epoch >= args.epochs:
        log(f'{args.output_dir} already holds a run trained for {start_epoch} epochs (--epochs {args.epochs}): '
            f'nothing to do; raise --epochs to train on, or pick another --output_dir')
    return logger
