"""util/cli.py: flags documented with defaults, no abbreviations, machine defaults, output folders, single errors."""
import argparse
import os

import pytest

import main_finetune
import main_linprobe
import main_pretrain
import visualize
from conftest import launch, pretrain_argv
from tools import checkpoint_tools
from util import cli, config, slurm
from util.errors import LocalError, UserError

PARSERS = {'main_pretrain': main_pretrain.get_args_parser, 'main_finetune': main_finetune.get_args_parser,
           'main_linprobe': main_linprobe.get_args_parser, 'visualize': visualize.get_args_parser,
           'submitit_pretrain': lambda: slurm.add_slurm_args(main_pretrain.get_args_parser()),
           'checkpoint_tools': checkpoint_tools.get_args_parser}


def actions(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from actions(sub)
        elif not isinstance(action, argparse._HelpAction):
            yield action


@pytest.mark.parametrize('name', PARSERS)
def test_every_flag_has_help_and_help_shows_defaults(name):
    parser = PARSERS[name]()
    undocumented = [a.dest for a in actions(parser) if not (a.help or '').strip()]
    assert not undocumented, undocumented
    text = ' '.join(parser.format_help().split())
    shown = {'main_pretrain': 'hidden from the encoder (default: 0.75)', 'main_finetune': 'lr decay (default: 0.65)',
             'main_linprobe': 'initialisation (default: 0)', 'visualize': 'so that labels fit (default: 1)'}
    assert shown.get(name, '') in text


def test_abbreviated_flags_are_refused(capsys):
    """argparse would take `--epoch 3` as --epochs 3 without a word."""
    with pytest.raises(SystemExit):
        cli.parse_args(main_pretrain.get_args_parser(), main_pretrain.DEMO_DEFAULTS, ['--epoch', '3'])
    assert 'unrecognized arguments: --epoch 3' in capsys.readouterr().err


def test_given_flags_and_the_worker_default_capped_at_the_cpus(monkeypatch):
    parser = main_pretrain.get_args_parser()
    assert cli.given_flags(parser, ['--epochs', '3', '--no-attn_mask']) == {'epochs', 'attn_mask'}
    monkeypatch.setattr(config, 'available_cpus', lambda: 3)
    args = cli.parse_args(parser, main_pretrain.DEMO_DEFAULTS, ['--data_path', '/data'])
    assert args.num_workers == 3  # default 10, but only 3 CPUs: the DataLoader would warn about more
    args = cli.parse_args(main_pretrain.get_args_parser(), main_pretrain.DEMO_DEFAULTS,
                          ['--data_path', '/data', '--num_workers', '8'])
    assert args.num_workers == 8  # what the user asks for


def test_clamped_finetuning_warmup(capsys):
    args = cli.parse_args(main_finetune.get_args_parser(), main_finetune.DEMO_DEFAULTS,
                          ['--data_path', '/data', '--epochs', '2'])
    assert args.warmup_epochs == 2
    assert 'the default --warmup_epochs 5 exceeds --epochs 2' in capsys.readouterr().out


def test_output_dir_checks(tmp_path):
    cli.check_output_dir(str(tmp_path / 'new' / 'nested'), '--output_dir')
    assert (tmp_path / 'new' / 'nested').is_dir()
    (tmp_path / 'file').write_text('x')
    with pytest.raises(UserError, match=r'^--output_dir .*file is a file, not a folder; pass a folder path$'):
        cli.check_output_dir(str(tmp_path / 'file'), '--output_dir')
    with pytest.raises(UserError, match=r'^--log_dir .*file/sub lies under a file'):
        cli.check_output_dir(str(tmp_path / 'file' / 'sub'), '--log_dir')
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        (tmp_path / 'ro').mkdir(mode=0o555)
        with pytest.raises(UserError, match='is not writable'):
            cli.check_output_dir(str(tmp_path / 'ro' / 'out'), '--output_dir')
    with pytest.raises(UserError, match='is not writable'):
        cli.check_output_dir('/proc/milan-out', '--output_dir')


def test_an_error_under_torchrun_is_printed_once(tiny_data, tmp_path):
    output = launch(tmp_path, ['torch.distributed.run'], 'main_pretrain.py',
                    pretrain_argv(tiny_data, tmp_path / 'out', '--mask_ratio', '1.5'), returncode=1)
    assert output.count('error: --mask_ratio must be between 0 and 1') == 1, output
    assert 'exitcode  : 2' in output or 'exitcode: 2' in output.replace(' ', '')


@pytest.mark.parametrize('error,printed', [(UserError('bad flag'), ''),
                                           (LocalError('bad image'), '[rank 1] bad image')])
def test_other_ranks_print_only_what_they_met_alone(monkeypatch, capsys, error, printed):
    """Rank 0 prints what every process meets alike; an error in one process's own data is printed there."""
    monkeypatch.setattr(cli, 'launch_rank', lambda: 1)
    monkeypatch.setattr(cli, 'world_size', lambda: 2)
    monkeypatch.setattr(cli, 'SILENT_EXIT_DELAY_S', 0)

    def main(args):
        raise error

    with pytest.raises(SystemExit) as exit_:
        cli.run(main, None)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (f'error: {printed}\n' if printed else '')


def test_pin_mem_switches_both_ways():
    parse = main_pretrain.get_args_parser().parse_args
    assert parse([]).pin_mem and parse(['--pin_mem']).pin_mem
    assert not parse(['--no-pin_mem']).pin_mem and not parse(['--no_pin_mem']).pin_mem
