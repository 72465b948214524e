"""The benchmark scripts run (tiny CPU settings) and print a header and well-formed tables; speed itself is never
asserted in tests."""
import argparse
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import main_pretrain
from conftest import ROOT, cli_env
from models_clip import build_random_teacher

TINY = ['--device', 'cpu', '--input_size', '32', '--batch_sizes', '4', '--precisions', 'fp32', '--compile', 'off',
        '--steps', '2', '--warmup', '1']


def markdown_tables(text):
    """Every markdown table in `text`, each as a list of {column: cell} rows."""
    tables, rows = [], []
    for line in text.splitlines() + ['']:
        if line.startswith('| '):
            if '---' not in line:
                rows.append([cell.strip() for cell in line.strip('|').split('|')])
        elif rows:
            tables.append([dict(zip(rows[0], row)) for row in rows[1:]])
            rows = []
    return tables


def bench(script, *argv):
    """(header lines, table rows as {column: cell}) of one run."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', script), *argv],
                            cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    header = [line for line in result.stdout.splitlines() if line.startswith('# ')]
    return header, markdown_tables(result.stdout)[0]


@pytest.fixture()
def benchmarks():
    """The benchmark scripts importable as modules (they import each other by bare name)."""
    sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
    try:
        yield
    finally:
        sys.path.remove(os.path.join(ROOT, 'benchmarks'))


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
    _, (row, shards) = bench('bench_pretrain.py', '--loader', *TINY, '--generate', '24', '--num_workers', '1',
                             '--sources', 'folder', 'shards', '--shard_size', '10')
    assert row['decode'] == 'CPU workers' and row['files'] == '24' and float(row['images/s'].replace(',', '')) > 0
    assert (row['source'], shards['source'], shards['files']) == ('folder', 'shards', '24')
    assert float(shards['images/s'].replace(',', '')) > 0
    _, (row,) = bench('bench_pretrain.py', '--loader', '--gpu_decode', *TINY, '--generate', '24', '--num_workers',
                      '1')
    assert row['decode'] == 'cpu (device)' and float(row['images/s'].replace(',', '')) > 0


def test_teacher_benchmark_rows_relative_to_openai():
    """Two of the README's teachers at batch 1 (ViT-B size, random weights): grid, width, importance, speed."""
    _, (openai, dino) = bench('bench_teacher.py', '--device', 'cpu', '--precision', 'fp32', '--compile', 'off',
                              '--batch_size', '1', '--steps', '1', '--warmup', '0', '--only', '224.dino')
    assert openai['teacher'].startswith('OpenAI') and openai['relative to OpenAI'] == '1.00'
    assert (dino['grid'], dino['target width'], dino['importance']) == ('14x14', '768', 'class token')
    assert float(dino['images/s'].replace(',', '')) > 0 and float(dino['relative to OpenAI']) > 0


def test_finetune_benchmark_rows():
    _, (row,) = bench('bench_finetune.py', *TINY, '--models', 'vit_tiny_patch8')
    assert (row['model'], row['data']) == ('vit_tiny_patch8', 'synthetic') and float(row['GFLOP/image']) > 0
    _, (row,) = bench('bench_finetune.py', *TINY, '--models', 'vit_tiny_patch8', '--data', 'jpeg', '--generate',
                      '16', '--num_workers', '1')
    assert row['data'] == 'jpeg, 1 workers' and float(row['images/s'].replace(',', '')) > 0


@pytest.fixture()
def estimate_memory(benchmarks):
    import estimate_memory
    return estimate_memory


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


def test_attention_flops_counted_on_the_cpu(benchmarks):
    """torch counts 0 for the CPU's fused attention kernel; the benchmarks' counter gives it torch's CUDA count:
    4 B H Nq Nk D forward (two products), 2.5 times that backward."""
    import common
    b, h, nq, nk, d = 2, 3, 5, 7, 16
    q = torch.randn(b, h, nq, d, requires_grad=True)
    k, v = (torch.randn(b, h, nk, d, requires_grad=True) for _ in range(2))
    with common.flop_counter() as counter:
        out = F.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 4 * b * h * nq * nk * d
    with common.flop_counter() as counter:
        out.sum().backward()
    assert counter.get_total_flops() == 10 * b * h * nq * nk * d


def test_gpu_check_toy_mode(tmp_path):
    """The GPU check's every section at toy size on the CPU (compiled, bf16 autocast): the same code path as on
    a GPU. The table file holds what was printed, every correctness row passes, every speed row has a speed."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'gpu_check.py'), str(tmp_path), '--toy'],
                            cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (tmp_path / 'gpu_check.md').read_text()
    assert text == result.stdout
    header = [line for line in text.splitlines() if line.startswith('# ')]
    assert 'torch ' + torch.__version__ in header[0] and 'torchvision ' in header[0]
    assert header[1] == f'# python benchmarks/gpu_check.py {tmp_path} --toy'
    correctness, speed = markdown_tables(text)
    assert [row['check'].split(':')[0].split(' (')[0] for row in correctness] == [
        'compiled bf16 step vs eager fp32'] * 3 + ['--gpu_decode', 'visualize.panels on compiled blocks',
                                                   'one DDP step']
    assert all(row['result'] == 'PASS' for row in correctness), correctness
    assert [row['setting'].split(',')[0] for row in speed] == [
        'MILAN mae_vit_tiny_patch8', 'MAE baseline mae_vit_tiny_patch8', 'loader', 'loader',
        'fine-tuning vit_tiny_patch8']
    assert all(float(row['images/s'].replace(',', '')) > 0 for row in speed), speed
    assert all(float(row['GFLOP/image']) > 0 for row in speed if not row['setting'].startswith('loader'))
