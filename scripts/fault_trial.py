"""Fault-injection trial: kill or stop a small pretraining run at random moments, run the same command again
until it finishes, and check that every trial ends with the uninterrupted run's weights and log.txt.

    python scripts/fault_trial.py --trials 10 --faults SIGTERM SIGKILL SIGTERM-group

Each trial starts the run, sends one fault at a random time inside it, then reruns the same command until it
exits 0 (a fault that lands after the run finished counts as 'too late'). It prints one line per trial and a
table per fault: how many resumed identically, how many differed, which exit codes the faulted runs gave.
Only the CPU is used; the run is the tiny demo model on 32x32 images (about 10 s)."""
import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from util.demo_data import ensure_demo_dataset  # noqa: E402 (the repository root on the path first)


def command(out, data, workers):
    return [sys.executable, os.path.join(ROOT, 'main_pretrain.py'), '--data_path', data, '--output_dir', out,
            '--epochs', '4', '--warmup_epochs', '1', '--input_size', '32', '--batch_size', '16', '--num_workers',
            str(workers), '--print_freq', '2', '--vis_every', '0', '--knn_every', '0', '--save_every_min', '0.01',
            '--seed', '7', '--device', 'cpu']


def run(cmd, fault=None, after=None):
    """Run `cmd`; with `fault`, send it `after` seconds in. Returns (exit code, whether the fault was sent)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    sent = False
    if fault:
        try:
            proc.wait(timeout=after)
        except subprocess.TimeoutExpired:
            name, group = fault.split('-')[0], fault.endswith('-group')
            sig = getattr(signal, name)
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
            sent = True
    return proc.wait(timeout=600), sent


def final_state(out):
    model = torch.load(os.path.join(out, 'checkpoint-last.pth'), map_location='cpu', weights_only=True)['model']
    with open(os.path.join(out, 'log.txt')) as f:
        losses = [json.loads(line)['train_loss'] for line in f]
    return model, losses


def same(a, b):
    return a[0].keys() == b[0].keys() and all((a[0][k] == b[0][k]).all() for k in a[0]) and a[1] == b[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--trials', type=int, default=5, help='trials per fault')
    parser.add_argument('--faults', nargs='+', default=['SIGTERM', 'SIGKILL', 'SIGTERM-group', 'SIGINT'],
                        help='signals to send; NAME-group sends it to the whole process group')
    parser.add_argument('--num_workers', type=int, default=2)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--data_path', default=None, help='default: the demo images')
    args = parser.parse_args()
    random.seed(args.seed)
    data = args.data_path or ensure_demo_dataset()
    work = tempfile.mkdtemp(prefix='fault_trial_')
    reference_dir = os.path.join(work, 'reference')
    start = time.time()
    code, _ = run(command(reference_dir, data, args.num_workers))
    assert code == 0, f'the uninterrupted run failed with exit code {code}'
    duration, reference = time.time() - start, final_state(reference_dir)
    print(f'uninterrupted run: {duration:.1f} s, losses {reference[1]}', flush=True)
    table = collections.defaultdict(collections.Counter)
    for fault in args.faults:
        for trial in range(args.trials):
            out = os.path.join(work, f'{fault}-{trial}')
            after = random.uniform(0.0, duration)
            code, sent = run(command(out, data, args.num_workers), fault, after)
            faulted, restarts = code, 0
            while code != 0 and restarts < 5:
                code, _ = run(command(out, data, args.num_workers))
                restarts += 1
            verdict = ('too late' if not sent else 'identical' if code == 0 and same(final_state(out), reference)
                       else 'DIFFERENT' if code == 0 else f'FAILED (exit {code})')
            table[fault][verdict] += 1
            table[fault][f'exit {faulted}'] += 1
            print(f'{fault} at {after:.1f} s: exit {faulted}, {verdict} after {restarts} rerun(s)', flush=True)
            shutil.rmtree(out, ignore_errors=True)
    print('\n| fault | trials | resumed identically | different | failed | too late | faulted runs\' exit codes |\n'
          '| --- | --- | --- | --- | --- | --- | --- |')
    for fault, counts in table.items():
        failed = sum(n for verdict, n in counts.items() if verdict.startswith('FAILED'))
        codes = ', '.join(f'{k[5:]} x{n}' for k, n in sorted(counts.items()) if k.startswith('exit '))
        print(f'| {fault} | {args.trials} | {counts["identical"]} | {counts["DIFFERENT"]} | {failed} | '
              f'{counts["too late"]} | {codes} |')
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
