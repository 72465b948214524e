"""Shared fixtures: a small generated JPEG dataset, runners for the entry points in a fresh process, and a
2-process torchrun launcher."""
import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tools.make_shards import make_shards  # noqa: E402
from util.demo_data import ensure_demo_dataset  # noqa: E402
from util.preemption import STOP  # noqa: E402


CLIP_PATCH, CLIP_GRID = 8, 4  # the tiny reference CLIP's vision tower: 8px patches on a 4x4 grid


@pytest.fixture(scope='session')
def clip():
    """openai-clip, the reference implementation: a test dependency only, the runtime never imports it."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # openai-clip imports the deprecated pkg_resources
        return pytest.importorskip('clip')


@pytest.fixture(scope='session')
def clip_sd(clip):
    """A tiny full CLIP (2 vision heads, 3 blocks) with every parameter perturbed, so no LayerNorm or bias
    is trivial."""
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = clip.model.CLIP(embed_dim=32, image_resolution=CLIP_PATCH * CLIP_GRID, vision_layers=3,
                                vision_width=128, vision_patch_size=CLIP_PATCH, context_length=8, vocab_size=100,
                                transformer_width=64, transformer_heads=1, transformer_layers=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval(), {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Nothing a test runs may read or write the user's ~/.cache."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))


@pytest.fixture(autouse=True)
def signal_handlers_restored():
    """A run started in this process takes the stop signals (util.runtime.start); give them back after."""
    yield
    STOP.uninstall()


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """4 classes x 8 train and 4 val images, real JPEGs through the real generator."""
    return ensure_demo_dataset(str(tmp_path_factory.mktemp('data')), train_per_class=8, val_per_class=4)


@pytest.fixture(scope='session')
def tiny_shards(tiny_data, tmp_path_factory):
    """tiny_data's train and val splits as WebDataset tar shards (tools/make_shards.py) in one folder: 10 samples
    per shard, so a split spans several shards."""
    out = str(tmp_path_factory.mktemp('shards'))
    with contextlib.redirect_stdout(io.StringIO()):
        for split in ('train', 'val'):
            make_shards(os.path.join(tiny_data, split), out, shard_size=10)
    return out


@pytest.fixture(scope='session')
def milan_checkpoint(tiny_data, tmp_path_factory):
    """checkpoint-last.pth of a real one-epoch MILAN pretraining (CLIP target, prompting decoder,
    semantic-aware masking, random tiny teacher) on tiny_data."""
    import main_pretrain
    from util.cli import parse_args
    out = tmp_path_factory.mktemp('pretrain')
    argv = pretrain_argv(tiny_data, out, '--use_clip', '--change_decoder', '--attn_mask')
    main_pretrain.main(parse_args(main_pretrain.get_args_parser(), main_pretrain.DEMO_DEFAULTS, argv))
    return str(out / 'checkpoint-last.pth')


def pretrain_argv(data, out, *extra):
    """A fast CPU pretraining command line on `data`: tiny model, 32x32 inputs, random tiny teacher."""
    return ['--data_path', data, '--output_dir', str(out), '--model', 'mae_vit_tiny_patch8', '--input_size', '32',
            '--batch_size', '8', '--epochs', '1', '--warmup_epochs', '0', '--num_workers', '0', '--device', 'cpu',
            '--clip_model', 'random', '--print_freq', '2', *extra]


def cli_env():
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')


def run_cli(argv, script='main_pretrain.py', timeout=300):
    """The real command line in a fresh process (one thread, so runs are bit-for-bit comparable)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def interrupt(args, when, sig, group=False, again=None, script='main_pretrain.py', timeout=300, torchrun=False):
    """Start the CLI (under torchrun with NPROC processes with `torchrun`), send `sig` (to its whole process group
    with `group`: what a terminal's Ctrl-C and SLURM's scancel do; to torchrun itself with `torchrun`) once a line
    containing `when` is printed, and once more when one containing `again` is; return (exit code, output)."""
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(NPROC), '--master_addr',
                '127.0.0.1', '--master_port', str(free_port())] if torchrun else [sys.executable]
    proc = subprocess.Popen([*launcher, os.path.join(ROOT, script), *args], cwd=ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=group)
    output, cues = [], [cue for cue in (when, again) if cue]
    for line in proc.stdout:
        output.append(line)
        if cues[0] in line:
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
            cues.pop(0)
            if not cues:
                break
    output.append(proc.communicate(timeout=timeout)[0])
    return proc.returncode, ''.join(output)

NPROC = 2
TIMEOUT = 240


def free_port():
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def child_env(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'LOCAL_WORLD_SIZE')}
    env.update(OMP_NUM_THREADS='1', XDG_CACHE_HOME=str(tmp_path / 'cache'), PYTHONUNBUFFERED='1')
    return env


def launch(tmp_path, launcher, script, script_args, timeout=TIMEOUT, returncode=0):
    """`python -m <launcher> --nproc_per_node 2 ... script args` from the repository root; returns the
    combined output, failing the test (with that output) on another exit code or a timeout. One retry
    on a new port if the free port was taken in between."""
    for attempt in range(2):
        cmd = [sys.executable, '-m', *launcher, '--nproc_per_node', str(NPROC), '--master_addr', '127.0.0.1',
               '--master_port', str(free_port()), script, *script_args]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(tmp_path), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the workers it started
            output, _ = proc.communicate()
            pytest.fail(f'timed out after {timeout} s: {" ".join(cmd)}\n{output}')
        print(f'$ {" ".join(cmd)}\n{output}')  # shown by pytest when a later assertion fails
        if proc.returncode != 0 and attempt == 0 and re.search(r'EADDRINUSE|[Aa]ddress already in use', output):
            continue
        if proc.returncode != returncode:
            pytest.fail(f'exit code {proc.returncode}: {" ".join(cmd)}\n{output}')
        return output
