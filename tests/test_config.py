"""util/config: the flags settled in one place (from other flags and the machine, then from the device and the
process group) and the configuration as checkpoints and config.json record it."""
import argparse
import os

import torch

import main_finetune
import main_pretrain
from util import config
from util.cli import parse_args


def test_parse_settles_the_demo_log_dir_and_file_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'teacher.pt').write_bytes(b'x')
    args = parse_args(main_pretrain.get_args_parser(), main_pretrain.DEMO_DEFAULTS,
                      ['--clip_model', 'teacher.pt', '--output_dir', 'out'])
    assert args.demo and args.data_path == config.demo_data_root() == os.path.join(
        os.environ['XDG_CACHE_HOME'], 'milan', 'demo_data')
    assert args.log_dir == 'out' and args.clip_model == str(tmp_path / 'teacher.pt')
    named = parse_args(main_pretrain.get_args_parser(), main_pretrain.DEMO_DEFAULTS, ['--clip_model', 'ViT-B/16'])
    assert named.clip_model == 'ViT-B/16'  # a model name stays a name
    given = parse_args(main_pretrain.get_args_parser(), main_pretrain.DEMO_DEFAULTS,
                       ['--data_path', str(tmp_path), '--log_dir', 'logs'])
    assert not given.demo and given.data_path == str(tmp_path) and given.log_dir == 'logs'


def test_demo_fine_tuning_starts_from_the_demo_pretraining_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parser = main_finetune.get_args_parser
    assert parse_args(parser(), main_finetune.DEMO_DEFAULTS, []).finetune == ''
    os.makedirs(os.path.dirname(config.DEMO_PRETRAIN))
    open(config.DEMO_PRETRAIN, 'wb').close()
    assert parse_args(parser(), main_finetune.DEMO_DEFAULTS, []).finetune == str(tmp_path / config.DEMO_PRETRAIN)
    assert parse_args(parser(), main_finetune.DEMO_DEFAULTS, ['--eval', '--resume', 'x']).finetune == ''
    assert parse_args(parser(), main_finetune.DEMO_DEFAULTS, ['--data_path', str(tmp_path)]).finetune == ''


def test_device_settles_precision_compile_and_the_lr_from_the_effective_batch(capsys):
    args = argparse.Namespace(precision='auto', compile=None, batch_size=64, accum_iter=4, lr=None, blr=1e-3)
    config.settle_for_device(args, torch.device('cpu'))
    assert (args.precision, args.compile, args.lr) == ('fp32', False, 1e-3 * 256 / 256)
    assert 'effective batch 256 = 64 x 4 accumulation x 1 processes; lr 1.000e-03' in capsys.readouterr().out
    given = argparse.Namespace(precision='bf16', compile=True, batch_size=64, accum_iter=1, lr=0.5, blr=1e-3)
    config.settle_for_device(given, torch.device('cpu'))
    assert (given.precision, given.compile, given.lr) == ('bf16', True, 0.5)


def test_plain_keeps_exactly_the_plain_values():
    args = argparse.Namespace(a=1, b='x', c=None, d=(1, 2), e=[0.5, 'y'], f=torch.zeros(1), g=[object()],
                              h=torch.device('cpu'), i=True)
    assert config.plain(args) == {'a': 1, 'b': 'x', 'c': None, 'd': [1, 2], 'e': [0.5, 'y'], 'i': True}
