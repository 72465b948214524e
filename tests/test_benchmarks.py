"""The benchmark scripts run (tiny CPU settings) and print a header and well-formed tables; speed itself is never
asserted in tests."""
import argparse
import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import main_pretrain
from conftest import ROOT, cli_env
from util.clip_teacher import build_random_teacher

TINY = ['--device', 'cpu', '--input_size', '32', '--batch_sizes', '4', '--precisions', 'fp32', '--compile', 'off',
        '--steps', '2', '--warmup', '1']


def bench(script, *argv):
    """(header lines, table rows as {column: cell}) of one run."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', script), *argv],
                            cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = [line for line in lines if line.startswith('# ')]
    table = [[cell.strip() for cell in line.strip('|').split('|')] for line in lines
             if line.startswith('| ') and '---' not in line]
    return header, [dict(zip(table[0], row)) for row in table[1:]]


def test_pretrain_benchmark_header_and_rows():
    header, (milan,) = bench('bench_pretrain.py', *TINY, '--models', 'mae_vit_tiny_patch8', '--teacher', 'tiny')
    assert 'torch ' + torch.__version__ in header[0] and 'timm ' in header[0]
    assert header[1].startswith('# python benchmarks/bench_pretrain.py --device cpu')  # the exact command
    assert (milan['mode'], milan['model'], milan['batch'], milan['data']) == ('milan', 'mae_vit_tiny_patch8', '4',
                                                                              'synthetic')
    assert float(milan['images/s'].replace(',', '')) > 0 and float(milan['GFLOP/image']) > 0
    assert milan['peak GiB'] == '-' and milan['MFU'] == '-'  # CPU: no allocator statistics, no known peak rate
    _, (mae,) = bench('bench_pretrain.py', *TINY, '--models', 'mae_vit_tiny_patch8', '--mode', 'mae')
    assert mae['mode'] == 'mae' and float(mae['GFLOP/image']) != float(milan['GFLOP/image'])


def test_pretrain_benchmark_fed_by_generated_jpegs_decoded_on_the_device():
    _, (row,) = bench('bench_pretrain.py', *TINY, '--data', 'jpeg', '--gpu_decode', '--generate', '24',
                      '--num_workers', '1', '--teacher', 'tiny', '--models', 'mae_vit_tiny_patch8')
    assert row['data'] == 'jpeg, 1 workers, gpu decode' and float(row['images/s'].replace(',', '')) > 0


def test_loader_benchmark_generates_and_reads_jpegs():
    _, (row,) = bench('bench_pretrain.py', '--loader', *TINY, '--generate', '24', '--num_workers', '1')
    assert row['decode'] == 'CPU workers' and row['files'] == '24' and float(row['images/s'].replace(',', '')) > 0
    _, (row,) = bench('bench_pretrain.py', '--loader', '--gpu_decode', *TINY, '--generate', '24', '--num_workers',
                      '1')
    assert row['decode'] == 'cpu (device)' and float(row['images/s'].replace(',', '')) > 0


def test_finetune_benchmark_rows():
    _, (row,) = bench('bench_finetune.py', *TINY, '--models', 'vit_tiny_patch8')
    assert (row['model'], row['data']) == ('vit_tiny_patch8', 'synthetic') and float(row['GFLOP/image']) > 0
    _, (row,) = bench('bench_finetune.py', *TINY, '--models', 'vit_tiny_patch8', '--data', 'jpeg', '--generate',
                      '16', '--num_workers', '1')
    assert row['data'] == 'jpeg, 1 workers' and float(row['images/s'].replace(',', '')) > 0


@pytest.fixture()
def estimate_memory():
    sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
    try:
        import estimate_memory
        yield estimate_memory
    finally:
        sys.path.remove(os.path.join(ROOT, 'benchmarks'))


def test_memory_estimate_keeps_exactly_weights_and_adamw_state_between_steps(estimate_memory):
    """After two steps only the weights (student and teacher) and AdamW's two moments and step count stay:
    a tracker that missed releases, or counted a storage twice, would be off."""
    opts = argparse.Namespace(mode='milan', precision='fp32', input_size=32, teacher='tiny', device='cpu')
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    resident, peak = estimate_memory.estimate(opts, 'mae_vit_tiny_patch8', 4, fake)
    teacher = build_random_teacher(8, 4, **estimate_memory.TEACHERS['tiny'])
    args = estimate_memory.run_args(opts, 'mae_vit_tiny_patch8', 4, 'fp32', False)
    model = main_pretrain.build_model(args, teacher)
    weights = sum(t.nbytes for m in (model, teacher) for t in [*m.parameters(), *m.buffers()])
    trained = [p for p in model.parameters() if p.requires_grad]
    adamw = sum(2 * p.nbytes for p in trained) + 4 * len(trained)  # exp_avg, exp_avg_sq, float32 step
    assert abs(resident * 2 ** 30 - (weights + adamw)) <= 64  # two cached 3-channel constants at most
    peaks = [estimate_memory.estimate(opts, 'mae_vit_tiny_patch8', b, fake)[1] for b in (64, 128, 256)]
    assert peaks[0] > resident * 2  # activations and gradients on top of the weights
    assert peaks[2] - peaks[1] == pytest.approx(2 * (peaks[1] - peaks[0]), rel=0.02)  # activations grow with batch

def test_memory_estimate_table():
    _, (row,) = bench('estimate_memory.py', '--models', 'mae_vit_tiny_patch8', '--input_size', '32', '--batch_sizes',
                      '4', '--teacher', 'tiny')
    assert row['model'] == 'mae_vit_tiny_patch8' and float(row['estimated peak GiB']) > 0
