"""The submitit launchers: flags, the job environment, requeue on a signal-stopped run. The tests that need
submitit (a dev dependency: GPU images often lack it) are skipped without it."""
import os
import subprocess
import sys

import pytest

import main_pretrain
from conftest import ROOT, cli_env, pretrain_argv
from util import slurm
from util.errors import UserError


@pytest.fixture(autouse=True)
def restore_dist_env(monkeypatch):
    """The job function writes the torch.distributed variables into os.environ: undo that after each test."""
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.setenv(key, '')
        monkeypatch.delenv(key)
    monkeypatch.setenv('PYTHONPATH', os.environ.get('PYTHONPATH', ''))  # submit() extends it


@pytest.fixture
def submitit():
    return pytest.importorskip('submitit')


def test_submitit_job_trains_and_completes(submitit, tiny_data, tmp_path):
    """submitit's debug executor runs the real job function in this process, with its job environment."""
    out = tmp_path / 'out'
    job = slurm.submit(main_pretrain, 'milan_pretrain',
                       pretrain_argv(tiny_data, out, '--cluster', 'debug', '--ngpus', '1'))
    assert job.result() == {'completed': True}
    assert (out / 'checkpoint-last.pth').exists() and (out / 'submitit').is_dir()
    assert slurm.ROOT in os.environ['PYTHONPATH'].split(os.pathsep)  # jobs import the repository from anywhere


@pytest.mark.parametrize('module,flags,message', [
    ('main_pretrain', ['--mask_ratio', '1.5'], '--mask_ratio must be between 0 and 1'),
    ('main_finetune', ['--drop_path', '2'], r'--drop_path must be in \[0, 1\)'),
    ('main_linprobe', ['--eval'], '--eval needs --resume'),
], ids=['pretrain', 'finetune', 'linprobe'])
def test_bad_flags_are_refused_before_anything_is_queued(submitit, tiny_data, tmp_path, module, flags, message):
    import importlib
    out = tmp_path / 'out'
    argv = ['--data_path', tiny_data, '--output_dir', str(out), '--cluster', 'debug', *flags]
    with pytest.raises(UserError, match=message):
        slurm.submit(importlib.import_module(module), 'job', argv)
    assert not (out / 'submitit').exists()  # no job folder: nothing was submitted


def test_checkpoint_hook_requeues_the_same_run(submitit, tiny_data, tmp_path):
    args = main_pretrain.get_args_parser().parse_args(pretrain_argv(tiny_data, tmp_path))
    trainer = slurm.Trainer(main_pretrain.main, args)
    delayed = trainer.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.function.main is main_pretrain.main and delayed.function.args is args


def test_signal_stopped_run_requeues_itself(submitit, tmp_path, monkeypatch):
    calls = []

    class FakeEnv:
        global_rank, num_tasks, local_rank, hostnames, job_id = 0, 1, 0, ['node1'], '4242'

    monkeypatch.setattr(submitit, 'JobEnvironment', FakeEnv)
    monkeypatch.setattr(slurm.subprocess, 'check_call', lambda cmd, timeout: calls.append(cmd))
    monkeypatch.setenv('SLURM_JOB_ID', '4242')
    slurm.Trainer(lambda args: {'completed': False}, None)()
    assert calls == [['scontrol', 'requeue', '4242']]
    assert (os.environ['RANK'], os.environ['WORLD_SIZE'], os.environ['MASTER_ADDR']) == ('0', '1', 'node1')
    slurm.Trainer(lambda args: {'completed': True}, None)()
    assert len(calls) == 1  # a finished run is not requeued


def test_without_submitit_the_launchers_say_so_in_one_line(tmp_path):
    """GPU images often lack submitit: --help and a submission both exit 2 with one line, no traceback."""
    for argv in (['--help'], ['--output_dir', str(tmp_path / 'out')]):
        # None in sys.modules makes `import submitit` fail as if it were not installed
        code = (f'import runpy, sys; sys.modules["submitit"] = None; sys.argv[1:] = {argv!r}; '
                'runpy.run_path("submitit_pretrain.py", run_name="__main__")')
        r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                           timeout=120)
        assert (r.returncode, r.stdout) == (2, '')
        assert r.stderr == 'error: SLURM submission needs submitit: pip install submitit\n'
    assert not (tmp_path / 'out').exists()


def test_srun_without_a_launcher_reads_slurm_variables(monkeypatch, tmp_path):
    """`srun python main_pretrain.py ...`: ranks from SLURM, the rendezvous host from scontrol."""
    import argparse

    from util import distributed
    fake = tmp_path / 'scontrol'
    fake.write_text('#!/bin/sh\necho gpu-node-07\necho gpu-node-08\n')
    fake.chmod(0o755)
    monkeypatch.setenv('PATH', f'{tmp_path}:{os.environ["PATH"]}')
    for key, value in dict(SLURM_PROCID='3', SLURM_NTASKS='16', SLURM_LOCALID='3', SLURM_JOB_ID='123456',
                           SLURM_JOB_NODELIST='gpu-node-[07-08]').items():
        monkeypatch.setenv(key, value)
    args = argparse.Namespace(local_rank=0)
    distributed._from_slurm(args)
    assert (args.rank, args.world_size, args.local_rank) == (3, 16, 3)
    assert os.environ['MASTER_ADDR'] == 'gpu-node-07' and os.environ['MASTER_PORT'] == str(20000 + 123456 % 20000)


def test_the_submit_script_ends_cleanly_after_submitting(submitit, tiny_data, tmp_path):
    """The submit scripts hand util.cli.run a function that returns submitit's job, not a run's result dict."""
    argv = pretrain_argv(tiny_data, tmp_path / 'out', '--cluster', 'debug', '--ngpus', '1')
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'submitit_pretrain.py'), *argv], cwd=ROOT,
                            env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and 'submitted job' in result.stdout, result.stdout + result.stderr
