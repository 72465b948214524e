"""Shared fixtures: a small generated JPEG dataset and an in-process runner for the entry points."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from util.demo_data import ensure_demo_dataset  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Nothing a test runs may read or write the user's ~/.cache."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """4 classes x 8 train and 4 val images, real JPEGs through the real generator."""
    return ensure_demo_dataset(str(tmp_path_factory.mktemp('data')), train_per_class=8, val_per_class=4)


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
