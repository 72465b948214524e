"""Real multi-process training on the CPU (gloo): torchrun and the legacy torch.distributed.launch run
main_pretrain.py with 2 processes, and tests/dist_probe.py checks the data shards and a DDP step.

Each launch costs ~10-15 s on a 2-core machine, so there are three of them."""
import importlib.util
import json
import math
import os
import re
import signal
import subprocess

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

import models_milan
from conftest import NPROC, ROOT, TIMEOUT, child_env, interrupt, launch, pretrain_argv

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason='torch.distributed with the gloo backend is not available')


def test_torchrun_two_processes_train_with_accumulation(tiny_data, tmp_path):
    """Two epochs on 2 processes, CLIP target (random teacher), prompting decoder, semantic masking and
    --accum_iter 2: 32 images / (8 x 2 processes) = 2 iterations per epoch = 1 optimizer step, whose
    first micro-batch runs under DDP no_sync."""
    out = tmp_path / 'out'
    argv = pretrain_argv(tiny_data, out, '--epochs', '2', '--save_every', '1', '--accum_iter', '2',
                         '--use_clip', '--change_decoder', '--attn_mask')
    log = launch(tmp_path, ['torch.distributed.run'], 'main_pretrain.py', argv)

    assert re.search(r'effective batch 32 = 8 x 2 accumulation x 2 processes\b', log), log
    # log() prints on rank 0 only: one line per epoch, not one per process
    assert len(re.findall(r'epoch 0 done: loss', log)) == 1 and len(re.findall(r'epoch 1 done: loss', log)) == 1

    files = sorted(os.listdir(out))
    assert [f for f in files if f.endswith('.pth')] == ['checkpoint-0.pth', 'checkpoint-1.pth', 'checkpoint-last.pth']
    assert not [f for f in files if '.tmp' in f], files  # no half-written or competing writes left behind

    stats = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert [s['epoch'] for s in stats] == [0, 1]
    assert all(math.isfinite(s['train_loss']) and s['train_loss'] > 0 for s in stats)

    ckpt = torch.load(out / 'checkpoint-last.pth', map_location='cpu', weights_only=True)
    assert ckpt['kind'] == 'pretrain' and ckpt['epoch'] == 1
    saved = ckpt['args']
    assert saved['rank'] == 0 and saved['world_size'] == 2 and saved['distributed'] and saved['accum_iter'] == 2
    keys = set(ckpt['model'])
    assert not any(k.startswith('module.') or 'teacher' in k or k.startswith('clip') for k in keys)
    expected = models_milan.create_model('mae_vit_tiny_patch8', img_size=32, target='clip', prompting_decoder=True,
                                         target_dim=ckpt['model']['decoder_pred.weight'].shape[0]).state_dict()
    assert keys == set(expected)  # exactly the student: unwrapped from DDP, no teacher
    # 2 epochs x 1 step: accumulation really took 2 iterations per optimizer step
    steps = {float(s['step']) for s in ckpt['optimizer']['state'].values()}
    assert steps == {2.0}, steps
    epoch0 = torch.load(out / 'checkpoint-0.pth', map_location='cpu', weights_only=True)
    assert epoch0['epoch'] == 0


@pytest.mark.skipif(importlib.util.find_spec('torch.distributed.launch') is None,
                    reason='this torch no longer ships torch.distributed.launch')
def test_legacy_launch_passes_local_rank_flag(tiny_data, tmp_path):
    """torch.distributed.launch without --use_env appends --local-rank=N to the script's arguments;
    main_pretrain must accept it. Pixel target and MAE decoder (pretrain_argv's defaults) this time."""
    out = tmp_path / 'out'
    log = launch(tmp_path, ['torch.distributed.launch'], 'main_pretrain.py', pretrain_argv(tiny_data, out))
    assert 'unrecognized arguments' not in log
    assert 'x 2 processes' in log
    ckpt = torch.load(out / 'checkpoint-last.pth', map_location='cpu', weights_only=True)
    assert ckpt['epoch'] == 0 and ckpt['args']['world_size'] == 2 and not ckpt['args']['use_clip']


@pytest.fixture(scope='module', params=['folder', 'shards'])
def probe(request, tiny_data, tiny_shards, tmp_path_factory):
    """What each rank saw, reading the image folder or the tar shards made from it."""
    tmp = tmp_path_factory.mktemp('probe')
    data = tiny_data if request.param == 'folder' else tiny_shards
    launch(tmp, ['torch.distributed.run'], os.path.join('tests', 'dist_probe.py'), [data, str(tmp / 'out')])
    return [json.loads((tmp / 'out' / f'rank{r}.json').read_text()) for r in range(NPROC)]


def test_probe_process_group(probe):
    for r, rec in enumerate(probe):
        assert (rec['rank'], rec['world_size'], rec['local_rank']) == (r, NPROC, r)
        assert (rec['util_rank'], rec['util_world_size'], rec['is_main']) == (r, NPROC, r == 0)
        assert rec['distributed'] and rec['backend'] == 'gloo' and rec['device'] == 'cpu'
        assert (rec['sampler_rank'], rec['sampler_num_replicas'], rec['sampler_seed']) == (r, NPROC, 0)


def test_ranks_see_different_images(probe):
    n = probe[0]['dataset_len']
    assert n == 32 and all(rec['dataset_len'] == n for rec in probe)
    per_rank = math.ceil(n / NPROC)  # DistributedSampler pads to a multiple of the world size
    for rec in probe:
        assert rec['len_sampler'] == per_rank and rec['len_loader'] == per_rank // 8
    for epoch in range(2):
        shards = [rec['epochs'][epoch]['sampler_indices'] for rec in probe]
        assert all(len(s) == per_rank for s in shards)
        union = set().union(*shards)
        assert union == set(range(n))  # together the ranks cover the whole dataset
        if n % NPROC == 0:
            assert set(shards[0]).isdisjoint(shards[1])
        else:  # only the padding repeats
            assert sum(len(set(s)) for s in shards) - len(union) <= NPROC * per_rank - n
        for r, rec in enumerate(probe):
            # exactly DistributedSampler(rank=r, num_replicas=2, seed=0) at this epoch
            reference = DistributedSampler(range(n), num_replicas=NPROC, rank=r, shuffle=True, seed=0)
            reference.set_epoch(epoch)
            assert shards[r] == list(reference)
            ep = rec['epochs'][epoch]
            # drop_last batches follow the sampler's order; the loader yields exactly those images
            assert [i for b in ep['batches'] for i in b] == shards[r][:len(ep['batches']) * 8]
            assert all(len(b) == 8 for b in ep['batches'])
            assert ep['labels'] == [[rec['targets'][i] for i in b] for b in ep['batches']]
            assert ep['shapes'] == [[8, 3, 32, 32]] * len(ep['batches'])
        assert probe[0]['epochs'][epoch]['image_checksums'] != probe[1]['epochs'][epoch]['image_checksums']
    for rec in probe:  # set_epoch reshuffles
        assert rec['epochs'][0]['sampler_indices'] != rec['epochs'][1]['sampler_indices']
    assert probe[0]['epochs'][0]['sampler_indices'] + probe[1]['epochs'][0]['sampler_indices'] != \
        probe[0]['epochs'][1]['sampler_indices'] + probe[1]['epochs'][1]['sampler_indices']


def test_unreadable_images_are_counted_once_over_all_processes(probe):
    """Two distinct bad files, met by both ranks at different times: 2, never 3 or 4 (a per-process count
    summed over ranks would stop a multi-GPU run at a fraction of --max_bad_frac)."""
    assert [rec['bad_image_totals'] for rec in probe] == [[2, 2, 2], [2, 2, 2]]


def test_ddp_step_keeps_ranks_identical(probe):
    for rec in probe:
        d = rec['ddp']
        # the ranks started from different weights; DDP broadcast rank 0's
        assert d['checksums_before_ddp'][0] != d['checksums_before_ddp'][1]
        assert d['checksums_after_init'][0] == d['checksums_after_init'][1] == d['checksums_before_ddp'][0]
        assert d['max_diff_after_init'] == 0.0
        # each rank trained on its own images
        assert d['losses'][0] != d['losses'][1]
        # under no_sync the gradients stay local; the last micro-batch all-reduces the accumulated sum
        assert d['grad_checksums_after_no_sync'][0] != d['grad_checksums_after_no_sync'][1]
        assert d['grad_checksums_after_sync'][0] == d['grad_checksums_after_sync'][1]
        assert d['grad_max_abs'] > 0
        assert d['grad_max_abs_err_vs_reference'] <= 1e-6 + 1e-4 * d['grad_max_abs']
        # the step moved the weights, identically on both ranks
        assert d['param_change'] > 0
        assert d['checksums_after_step'][0] == d['checksums_after_step'][1]
        assert d['max_diff_after_step'] == 0.0
        assert d['checksums_after_step'][0] != d['checksums_after_init'][0]
    assert probe[0]['ddp'] == probe[1]['ddp']  # gathered values: both ranks saw the same
    assert all(rec['teacher_max_diff'] == 0.0 for rec in probe)  # --clip_model random agrees across ranks


def test_launch_script_single_node(tiny_data, tmp_path):
    """scripts/torchrun.sh, the README's launcher, on one node with 2 CPU processes."""
    out = tmp_path / 'out'
    env = dict(child_env(tmp_path), NPROC='2')
    result = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'torchrun.sh'), 'main_pretrain.py',
                             *pretrain_argv(tiny_data, out)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'x 2 processes' in result.stdout and (out / 'checkpoint-last.pth').exists()


def test_sigterm_to_torchrun_saves_and_resumes_identically(tiny_data, tmp_path):
    """torchrun passes a SIGTERM on to its workers (and their loader workers): every rank finishes its step,
    they save together, and the same command resumes to the model of an uninterrupted 2-process run."""
    def argv(out):
        return pretrain_argv(tiny_data, out, '--epochs', '2', '--print_freq', '1', '--num_workers', '2',
                             '--batch_size', '4', '--knn_every', '0')
    reference = tmp_path / 'reference'
    launch(tmp_path, ['torch.distributed.run'], 'main_pretrain.py', argv(reference))
    out = tmp_path / 'out'
    code, output = interrupt(argv(out), 'epoch 1 [1/4]', signal.SIGTERM, torchrun=True)
    assert re.search(r'stopped in epoch 1 after iteration [123], checkpoint saved', output), output
    assert 'DataLoader worker' not in output and 'Connection closed' not in output, output
    assert torch.load(out / 'checkpoint-last.pth', weights_only=True)['resume_iter'] in (1, 2, 3)
    launch(tmp_path, ['torch.distributed.run'], 'main_pretrain.py', argv(out))
    final = [torch.load(d / 'checkpoint-last.pth', weights_only=True)['model'] for d in (reference, out)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    assert [json.loads(line)['train_loss'] for line in (out / 'log.txt').read_text().splitlines()] == \
        pytest.approx([json.loads(line)['train_loss'] for line in (reference / 'log.txt').read_text().splitlines()])


def test_start_up_waits_outlast_the_process_groups_timeout_and_end_at_their_own(tmp_path):
    """A main process that downloads a teacher (main_first), or one indexing its shards (in_turn), for longer than
    the process group's timeout (NCCL's 10 minutes; 2 s in tests/wait_probe.py) keeps the others waiting rather than
    failing them: those waits meet in the rendezvous store, up to util.distributed.START_UP_TIMEOUT (2 hours; 10 s
    here). Past that limit (3 s against a 5 s step) the run ends with a line saying where it waited."""
    output = launch(tmp_path, ['torch.distributed.run'], os.path.join('tests', 'wait_probe.py'), ['10'])
    for r in range(NPROC):
        assert f"rank {r}: waited past the group's 2 s timeout; all_reduce gives {NPROC}" in output
    output = launch(tmp_path, ['torch.distributed.run'], os.path.join('tests', 'wait_probe.py'), ['3'], returncode=1)
    assert 'rank 1: error: the other processes did not finish start-up within 0:00:03 (this process waited at ' \
           'start-up step 1' in output
