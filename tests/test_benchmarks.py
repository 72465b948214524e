"""The benchmark scripts run (a tiny CPU setting) and print a well-formed table; speed itself is never
asserted in tests."""
import os
import subprocess
import sys

from conftest import ROOT, cli_env


def bench(*argv):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'bench_train.py'), *argv],
                            cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line.startswith('| ') and '---' not in line]


def test_step_benchmark_table():
    rows = bench('--device', 'cpu', '--models', 'mae_vit_tiny_patch8', '--input_size', '32', '--batch_sizes', '4',
                 '--precisions', 'fp32', '--compile', 'off', '--steps', '2', '--warmup', '1', '--teacher', 'tiny')
    header, row = rows
    cells = dict(zip(header.strip('|').split('|'), row.strip('|').split('|')))
    cells = {k.strip(): v.strip() for k, v in cells.items()}
    assert cells['mode'] == 'milan' and cells['model'] == 'mae_vit_tiny_patch8' and cells['batch'] == '4'
    assert float(cells['images/s'].replace(',', '')) > 0 and float(cells['GFLOP/image']) > 0


def test_finetune_benchmark_row():
    header, row = bench('--device', 'cpu', '--mode', 'finetune', '--models', 'mae_vit_tiny_patch8', '--input_size',
                        '32', '--batch_sizes', '4', '--precisions', 'fp32', '--compile', 'off', '--steps', '2',
                        '--warmup', '1')
    assert row.split('|')[1:3] == [' finetune ', ' vit_tiny_patch8 ']


def test_loader_benchmark_generates_jpegs(tmp_path):
    rows = bench('--loader', '--device', 'cpu', '--generate', '24', '--num_workers', '1', '--batch_sizes', '8',
                 '--input_size', '32')
    assert rows[1].split('|')[5].strip() == '24'  # files generated and read
    rows = bench('--loader', '--gpu_decode', '--device', 'cpu', '--generate', '24', '--num_workers', '1',
                 '--batch_sizes', '8', '--input_size', '32')
    assert rows[1].split('|')[1].strip() == 'cpu (device)' and float(rows[1].split('|')[4].replace(',', '')) > 0
