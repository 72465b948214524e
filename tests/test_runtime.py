"""util/runtime.py: run start-up on the CPU leaves cores to the loader workers."""
import torch

import main_pretrain
from util import cli, config, runtime


def test_cpu_training_leaves_cores_to_the_loader_workers(tmp_path, monkeypatch):
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    monkeypatch.setattr(config, 'available_cpus', lambda: 6)
    args = cli.parse_args(main_pretrain.get_args_parser(), main_pretrain.DEMO_DEFAULTS,
                          ['--data_path', '/data', '--output_dir', str(tmp_path), '--num_workers', '4'])
    threads = torch.get_num_threads()
    try:
        runtime.start(args)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
