"""util/checkpoint.py: atomic checkpoint files, the latest one, resuming, and refusing bad files."""
import argparse
import errno
import os
import shutil

import pytest
import torch

from util.checkpoint import latest_checkpoint, load_checkpoint, load_optimizer_state, resume_training, save_atomic
from util.errors import UserError


def test_checkpoint_is_weights_only_loadable_and_atomic(tmp_path):
    path = str(tmp_path / 'checkpoint-last.pth')
    save_atomic({'kind': 'pretrain', 'model': {'w': torch.ones(2)}, 'epoch': 3, 'args': {'model': 'x'}}, path)
    assert torch.load(path, weights_only=True)['epoch'] == 3
    assert os.listdir(tmp_path) == ['checkpoint-last.pth']  # no temporary left behind

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError('disk full')
    with pytest.raises(RuntimeError):
        save_atomic({'kind': 'pretrain', 'x': Unpicklable()}, path)
    assert load_checkpoint(path, 'pretrain')['epoch'] == 3  # the good one survived a failed write
    assert os.listdir(tmp_path) == ['checkpoint-last.pth']


def test_latest_checkpoint(tmp_path):
    assert latest_checkpoint(str(tmp_path)) is None
    for epoch in (4, 19, 9):
        save_atomic({'epoch': epoch}, str(tmp_path / f'checkpoint-{epoch}.pth'))
    assert latest_checkpoint(str(tmp_path)).endswith('checkpoint-19.pth')
    save_atomic({'epoch': 20}, str(tmp_path / 'checkpoint-last.pth'))
    assert latest_checkpoint(str(tmp_path)).endswith('checkpoint-last.pth')


def test_resume_keeps_this_runs_optimizer_settings_and_the_checkpoints_moments(capsys):
    """load_state_dict alone would bring back the saved weight decay and layer-decay scales, silently
    overriding changed flags; the moments and step counts must come from the checkpoint."""
    model = torch.nn.Linear(3, 2)
    saved = torch.optim.AdamW([{'params': [model.weight], 'weight_decay': 0.05, 'lr_scale': 0.5},
                               {'params': [model.bias], 'weight_decay': 0.0, 'lr_scale': 1.0}], lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    saved.step()
    resumed = torch.optim.AdamW([{'params': [model.weight], 'weight_decay': 0.3, 'lr_scale': 0.9},
                                 {'params': [model.bias], 'weight_decay': 0.0, 'lr_scale': 1.0}], lr=1e-3)
    load_optimizer_state(resumed, saved.state_dict())
    assert [(g['weight_decay'], g['lr_scale']) for g in resumed.param_groups] == [(0.3, 0.9), (0.0, 1.0)]
    for p in model.parameters():
        assert torch.equal(resumed.state[p]['exp_avg'], saved.state[p]['exp_avg'])
    assert "differ from the checkpoint's: lr_scale, weight_decay" in capsys.readouterr().out


def test_mid_epoch_resume_with_another_seed_is_refused(tmp_path):
    """The seed sets the shuffle that a mid-epoch resume replays: another seed would see some images twice."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    layout = dict(world_size=1, batch_size=8, accum_iter=1)
    save_atomic({'kind': 'pretrain', 'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': 2,
                 'resume_iter': 3, 'args': {**layout, 'seed': 0}}, str(tmp_path / 'checkpoint-last.pth'))
    args = argparse.Namespace(resume=None, output_dir=str(tmp_path), start_epoch=0, seed=1, **layout)
    with pytest.raises(UserError, match='with --seed 0; resume with the same numbers'):
        resume_training(args, model, optimizer, None, 'pretrain')
    args.seed = 0
    assert resume_training(args, model, optimizer, None, 'pretrain')[0] == (2, 3)


def test_load_checkpoint_refuses_bad_files(tmp_path):
    truncated = tmp_path / 'truncated.pth'
    save_atomic({'kind': 'pretrain', 'model': {'w': torch.ones(1000)}}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:500])
    with pytest.raises(UserError, match='truncated'):
        load_checkpoint(str(truncated), 'pretrain')
    other = tmp_path / 'other.pth'
    save_atomic({'kind': 'finetune', 'model': {}}, str(other))
    with pytest.raises(UserError, match='not a pretrain checkpoint'):
        load_checkpoint(str(other), 'pretrain')


def test_a_full_disk_is_one_line_and_the_last_checkpoint_survives(tmp_path, monkeypatch):
    """ENOSPC as torch's writer reports it (a RuntimeError chained from the OSError), and a disk whose free space is
    below the size of the checkpoint being replaced, checked before writing."""
    path = str(tmp_path / 'checkpoint-last.pth')
    save_atomic({'kind': 'pretrain', 'epoch': 1, 'w': torch.ones(1000)}, path)

    def full(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, 'No space left on device')
        except OSError as e:
            raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 64') from e

    monkeypatch.setattr(torch, 'save', full)
    with pytest.raises(UserError) as e:
        save_atomic({'kind': 'pretrain', 'epoch': 2}, path)
    message = str(e.value)
    assert message.startswith(f'no space left in {tmp_path} to write checkpoint-last.pth (it needs about ')
    assert 'the last good checkpoint there is intact' in message and '\n' not in message
    assert load_checkpoint(path, 'pretrain')['epoch'] == 1 and os.listdir(tmp_path) == ['checkpoint-last.pth']
    monkeypatch.undo()
    monkeypatch.setattr(shutil, 'disk_usage', lambda folder: shutil._ntuple_diskusage(10 ** 9, 10 ** 9 - 10, 10))
    with pytest.raises(UserError, match='^no space left in .* GiB are free'):
        save_atomic({'kind': 'pretrain', 'epoch': 2}, path)
    assert load_checkpoint(path, 'pretrain')['epoch'] == 1
