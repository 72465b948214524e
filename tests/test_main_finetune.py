"""main_finetune.py: the demo fine-tune, the fine-tuning flags' checks, and bad --finetune files."""
import argparse
import json

import pytest
import torch

import main_finetune
import models_milan
from test_main_classification import cls_argv, raises_one_line, run


def test_demo_fine_tune_beats_chance(tmp_path, monkeypatch, capsys):
    """The README's demo command (generated 4 x 64 training / 4 x 32 validation grey images at 64x64, tiny ViT)
    for 5 epochs instead of 10, from random initialisation (this working directory has no demo pretraining
    checkpoint). Its classes differ only by shape or texture: 5 epochs reach 66-70% with seeds 0-3, 1 epoch
    29%; chance is 25%."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / 'demo'
    args, stats = run(main_finetune, ['--epochs', '5', '--device', 'cpu', '--output_dir', str(out)])
    assert args.demo and args.model == 'vit_tiny_patch8' and args.input_size == 64 and args.nb_classes == 4
    assert 'training from random initialisation' in capsys.readouterr().out
    logged = [json.loads(line) for line in open(out / 'log.txt')]
    assert [s['epoch'] for s in logged] == [0, 1, 2, 3, 4]
    assert stats['acc1'] == logged[-1]['val_acc1'] > 50


def test_pretraining_checkpoint_of_another_size(tiny_data, tmp_path):
    """An encoder-only vit_small pretraining checkpoint (as MAE releases them: 384 wide, 12 blocks) given to
    --model vit_tiny_patch8 (192 wide). Shapes from a meta-device model: no 47M-parameter initialisation."""
    with torch.device('meta'):
        small = models_milan.create_model('mae_vit_small_patch16', img_size=32, target='pixel').state_dict()
    path = tmp_path / 'mae_pretrain_vit_small.pth'
    torch.save({'model': {k: torch.zeros(v.shape) for k, v in small.items() if not k.startswith(('decoder', 'mask'))},
                'args': argparse.Namespace(model='mae_vit_small_patch16'), 'epoch': 799}, path)
    message = raises_one_line(r'mae_pretrain_vit_small.pth does not fit this model \(.*\); pass the --model it was '
                              r'pretrained as', main_finetune, cls_argv(tiny_data, tmp_path / 'out', '--finetune',
                                                                        str(path)))
    assert '384' in message and '192' in message  # names the mismatching shapes


@pytest.mark.parametrize('flags,message', [
    (['--drop_path', '1.5'], r'--drop_path must be in \[0, 1\), got 1.5'),
    (['--smoothing', '1'], r'--smoothing must be in \[0, 1\)'),
    (['--reprob', '2'], '--reprob is a probability, got 2.0'),
    (['--mixup_prob', '-0.1'], '--mixup_prob is a probability'),
    (['--cutmix', '-1'], '--mixup and --cutmix alphas must not be negative'),
    (['--layer_decay', '0'], r'--layer_decay must be in \(0, 1\]'),
], ids=['drop_path', 'smoothing', 'reprob', 'mixup_prob', 'cutmix', 'layer_decay'])
def test_bad_finetuning_flags(tiny_data, tmp_path, flags, message):
    raises_one_line(message, main_finetune, cls_argv(tiny_data, tmp_path / 'out', *flags))


def test_finetune_from_a_file_that_is_no_checkpoint(tiny_data, tmp_path):
    page = tmp_path / 'mae_pretrain_vit_base.pth'
    page.write_bytes(b'<html><body>404 Not Found</body></html>\n' * 10)  # what a failed download leaves
    message = raises_one_line('mae_pretrain_vit_base.pth as a checkpoint .*not a PyTorch file at all', main_finetune,
                              cls_argv(tiny_data, tmp_path / 'out', '--finetune', str(page)))
    assert 'weights_only' not in message
