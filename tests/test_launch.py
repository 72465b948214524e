"""util/launch.py: the launcher and rank read from the environment, before torch is imported."""
import subprocess
import sys

from conftest import ROOT
from util.launch import env_rank, launcher


def test_launcher_and_rank_from_the_environment(monkeypatch):
    for name in ('RANK', 'WORLD_SIZE', 'SLURM_NTASKS', 'SLURM_PROCID'):
        monkeypatch.delenv(name, raising=False)
    assert (launcher(), env_rank()) == (None, 0)
    monkeypatch.setenv('SLURM_NTASKS', '4')
    monkeypatch.setenv('SLURM_PROCID', '3')
    assert (launcher(), env_rank()) == ('srun', 3)
    monkeypatch.setenv('RANK', '1')
    monkeypatch.setenv('WORLD_SIZE', '2')
    assert (launcher(), env_rank()) == ('torchrun', 1)  # torchrun inside a SLURM job: its own rank


def test_the_stop_handler_imports_no_torch():
    """What the entry points import first, to take the stop signals before the seconds of importing torch."""
    code = 'import sys, util.preemption; assert "torch" not in sys.modules, sorted(sys.modules)'
    subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True)
