"""What a GPU run does by default (every block compiled, bf16 autocast, the TensorBoard panels, DDP), run end
to end on the CPU with Inductor's CPU backend, so that the first GPU run is not the first run of this code.

Compiling costs about a minute on 2 cores the first time; later runs read Inductor's cache. `-m 'not slow'`
skips these locally; CI runs them."""
import json
import os
import re
import signal

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import interrupt, launch, pretrain_argv, run_cli

pytestmark = pytest.mark.slow

# The default MILAN method, compiled in bf16: the same graphs for every pretraining run here, so one compile.
COMPILED = ['--compile', '--precision', 'bf16', '--use_clip', '--change_decoder', '--attn_mask']
CLS = ['--model', 'vit_tiny_patch8', '--input_size', '32', '--num_workers', '0', '--device', 'cpu', '--nb_classes',
       '4', '--batch_size', '8', '--epochs', '1', '--print_freq', '2', '--compile']


def panel_steps(log_dir):
    """The steps at which TensorBoard received the panels, over every event file of the folder."""
    steps = []
    for name in sorted(os.listdir(log_dir)):
        if name.startswith('events.out.tfevents'):
            events = EventAccumulator(os.path.join(log_dir, name), size_guidance={'images': 0})
            events.Reload()
            if 'panels' in events.Tags()['images']:
                steps += [image.step for image in events.Images('panels')]
    return sorted(steps)


def test_compiled_bf16_pretraining_draws_panels_survives_ctrl_c_and_resumes(tiny_data, tmp_path):
    """The GPU default on the CPU: compiled blocks, bf16 autocast, panels after every epoch; Ctrl-C in the
    second epoch saves mid-epoch, and the same command finishes the run."""
    out = tmp_path / 'out'
    argv = pretrain_argv(tiny_data, out, *COMPILED, '--epochs', '2', '--print_freq', '1', '--vis_every', '1',
                         '--vis_images', '2')
    code, output = interrupt(argv, 'epoch 1 [2/4]', signal.SIGINT)
    assert code == 130, output
    assert 'stopped in epoch 1 after iteration' in output and 'Traceback' not in output
    resume_iter = torch.load(out / 'checkpoint-last.pth', weights_only=True)['resume_iter']
    assert 0 < resume_iter < 4 and panel_steps(out) == [0]
    result = run_cli(argv)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f'epoch 1 at iteration {resume_iter}' in result.stdout and 'precision bf16' in result.stdout
    assert panel_steps(out) == [0, 1]
    ckpt = torch.load(out / 'checkpoint-last.pth', weights_only=True)
    assert ckpt['epoch'] == 1 and ckpt['args']['compile'] and ckpt['args']['precision'] == 'bf16'
    assert not any('_orig_mod' in key for key in ckpt['model'])  # compiling kept the state-dict keys
    stats = [json.loads(line) for line in open(out / 'log.txt')]
    assert [s['epoch'] for s in stats] == [0, 1] and all(0 < s['train_loss'] < 4 for s in stats)


@pytest.mark.parametrize('script', ['main_finetune.py', 'main_linprobe.py'])
def test_compiled_classification_trains_and_evaluates(milan_checkpoint, tiny_data, tmp_path, script):
    out = tmp_path / 'out'
    result = run_cli(['--data_path', tiny_data, '--output_dir', str(out), '--finetune', milan_checkpoint, *CLS,
                      '--warmup_epochs', '0'], script)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r'epoch 0: val top-1 \d', result.stdout), result.stdout
    ckpt = torch.load(out / 'checkpoint-last.pth', weights_only=True)
    assert ckpt['args']['compile'] and not any('_orig_mod' in key for key in ckpt['model'])


def test_compiled_two_process_torchrun_pretraining(tiny_data, tmp_path):
    out = tmp_path / 'out'
    output = launch(tmp_path, ['torch.distributed.run'], 'main_pretrain.py',
                    pretrain_argv(tiny_data, out, *COMPILED, '--vis_every', '1', '--vis_images', '2'))
    assert 'x 2 processes' in output and len(re.findall(r'epoch 0 done: loss', output)) == 1
    assert panel_steps(out) == [0]
    ckpt = torch.load(out / 'checkpoint-last.pth', weights_only=True)
    assert ckpt['args']['world_size'] == 2 and ckpt['args']['compile']
