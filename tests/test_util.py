"""Schedules, position embeddings, optimizer groups and checkpoint files."""
import argparse
import math
import os

import numpy as np
import pytest
import torch

from models_milan import create_model
from util.checkpoint import latest_checkpoint, load_checkpoint, load_optimizer_state, resume_training, save_atomic
from util.errors import UserError, one_line
from util.logger import RunLogger
from util.lr_sched import cosine_lr, set_lr
from util.optim import adamw, param_groups_weight_decay
from util.pos_embed import interpolate_pos_embed, sincos_2d
from util.train_loop import train_epoch


def test_cosine_schedule_values():
    kw = dict(base_lr=1.0e-3, min_lr=1.0e-5, warmup_epochs=40, epochs=400)
    assert cosine_lr(0, **kw) == 0
    assert cosine_lr(20, **kw) == pytest.approx(5e-4)
    assert cosine_lr(40, **kw) == pytest.approx(1e-3)  # end of warm-up: the peak
    assert cosine_lr(220, **kw) == pytest.approx((1e-3 + 1e-5) / 2)  # half-way through the cosine
    assert cosine_lr(400, **kw) == pytest.approx(1e-5)
    assert cosine_lr(130, **kw) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi / 4)))
    # stepped per iteration: fractional epochs move the lr
    assert cosine_lr(10.5, **kw) == pytest.approx(1e-3 * 10.5 / 40)


def test_set_lr_honours_lr_scale():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{'params': [p]}, {'params': [torch.nn.Parameter(torch.zeros(1))], 'lr_scale': 0.5}], lr=1)
    set_lr(opt, 0.2)
    assert [g['lr'] for g in opt.param_groups] == [0.2, 0.1]


def mae_reference_table(dim, grid):
    """An independent numpy float32 derivation of MAE's 2-D sin-cos table."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float32) / (d / 2.0))
        out = np.einsum('m,d->md', pos.reshape(-1).astype(np.float32), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    table = np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)
    return np.concatenate([np.zeros([1, dim], dtype=np.float32), table], axis=0)


def test_sincos_pos_embed_layout():
    table = sincos_2d(64, 14)
    assert table.shape == (197, 64) and table.dtype == torch.float32
    assert torch.count_nonzero(table[0]) == 0
    np.testing.assert_allclose(table.numpy(), mae_reference_table(64, 14), atol=1e-6)
    # patch 15 is row 1, column 1; patch 2 is row 0, column 2: first half follows the column
    assert torch.equal(table[1 + 2, :32], table[1 + 14 + 2, :32])
    assert torch.equal(table[1 + 14, 32:], table[1 + 14 + 5, 32:])


def test_pos_embed_interpolation():
    table = sincos_2d(32, 14)[None]
    assert torch.equal(interpolate_pos_embed(table, 14), table)
    bigger = interpolate_pos_embed(table, 24)
    assert bigger.shape == (1, 1 + 24 * 24, 32)
    assert torch.equal(bigger[:, 0], table[:, 0])


def test_weight_decay_groups():
    model = create_model('mae_vit_tiny_patch8', img_size=32, target='clip', target_dim=16, prompting_decoder=True)
    no_decay, decay = param_groups_weight_decay(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay['params']}
    decay_names = {names[id(p)] for p in decay['params']}
    assert no_decay['weight_decay'] == 0 and decay['weight_decay'] == 0.05
    assert {'cls_token', 'mask_token', 'blocks.0.attn.qkv.bias', 'blocks.0.norm1.weight', 'norm.bias',
            'decoder_blocks.0.attn.q.bias'} <= no_decay_names
    assert {'blocks.0.attn.qkv.weight', 'patch_embed.proj.weight', 'decoder_blocks.0.attn.kv.weight',
            'decoder_pred.weight'} <= decay_names
    assert not any('pos_embed' in n for n in no_decay_names | decay_names)  # fixed, never optimised
    assert len(no_decay_names) + len(decay_names) == len(list(model.parameters()))


def test_fused_adamw_matches_the_reference_update():
    """Our AdamW (fused, as on the GPU) takes the same steps as PyTorch's plain per-tensor AdamW on the same
    groups: decayed weights and the exempt biases, norms and tokens."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(create_model('mae_vit_tiny_patch8', img_size=32, target='pixel'))
    fused = adamw(param_groups_weight_decay(models[0], 0.05), 1e-2, (0.9, 0.95), torch.device('cpu'))
    reference = torch.optim.AdamW(param_groups_weight_decay(models[1], 0.05), lr=1e-2, betas=(0.9, 0.95),
                                  foreach=False, fused=False)
    assert fused.defaults['fused']
    torch.manual_seed(1)
    for _ in range(3):  # the same gradients for both, several steps so the moments matter
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        fused.step()
        reference.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


class CountingLoader:
    """`count` batches; remembers how many were actually loaded."""

    def __init__(self, count):
        self.sampler, self.loaded = argparse.Namespace(batches_per_epoch=count), 0

    def __iter__(self):
        for _ in range(self.sampler.batches_per_epoch):
            self.loaded += 1
            yield torch.ones(1), None, []


def test_epoch_drops_the_incomplete_accumulation_window_and_counts_what_ran():
    """5 batches with --accum_iter 2: 4 iterations, 2 updates, the 5th batch never loaded, and the epoch's
    mean loss is the mean of the 4 losses (not divided by 5)."""
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = argparse.Namespace(accum_iter=2, batch_size=1, lr=0.1, min_lr=0.0, warmup_epochs=0, epochs=1,
                              distributed=False, clip_grad=None, precision='fp32', print_freq=100, save_every_min=30)
    loader, steps = CountingLoader(5), []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    stats = train_epoch(model, loader, lambda batch: model(batch[0]).sum() * 0 + 1.0, optimizer,
                        torch.amp.GradScaler('cpu', enabled=False), 0, args, torch.device('cpu'), RunLogger(None, None))
    assert (stats['loss'], stats['iters_done'], len(steps), loader.loaded) == (1.0, 4, 2, 4)


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


def test_one_line_of_a_worker_reraised_error():
    wrapped = UserError('Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call '
                        'last):\n  File "x.py", line 1\nutil.errors.UserError: cannot read image /d/a.JPEG (bad)')
    assert one_line(wrapped) == 'cannot read image /d/a.JPEG (bad)'
    assert one_line(UserError('plain message')) == 'plain message'


@pytest.mark.parametrize('content,reason', [
    ('truncated', 'a damaged or incomplete zip archive'),
    (b'hello, this is a text file\n', 'not a pickle or zip archive that torch wrote'),
    (b'', 'an empty file'),
])
def test_unreadable_weight_files_say_why_in_our_words(tmp_path, content, reason):
    """No stray torch text: a truncated --finetune file's message used to end mid-sentence in miniz's, and a
    text file given as --clip_model added "(KeyError: 101)"."""
    from util.clip_teacher import load_clip_teacher
    from util.pretrained import read_checkpoint
    path = tmp_path / 'weights.pth'
    if content == 'truncated':
        torch.save({'model': {'w': torch.ones(10000)}}, path)
        content = path.read_bytes()[:5000]
    path.write_bytes(content)
    for read in (read_checkpoint, lambda p: load_clip_teacher(p, str(tmp_path))):
        with pytest.raises(UserError) as error:
            read(str(path))
        message = str(error.value)
        assert f'cannot read {path} as a ' in message and f'({reason}); it may be truncated' in message
        assert 'Error' not in message and 'miniz' not in message
