"""Fine-tuning and linear probing on the CPU: loading released MAE-layout and our own pretraining checkpoints,
position-table resizing, layer-wise lr decay, LARS, the frozen linear probe, a short demo fine-tune, exact
evaluation over 2 processes, resume and --eval, bad input, and loading our weights in timm."""
import argparse
import glob
import json
import os
import pickle
import shutil

import pytest
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import main_finetune
import main_linprobe
import main_pretrain
import models_milan
import models_vit
from conftest import pretrain_argv
from test_distributed import NPROC, launch
from util.cli import parse_args
from util.errors import UserError
from util.lars import LARS
from util.lr_decay import param_groups_layer_decay
from util.lr_sched import set_lr
from util.pretrained import load_pretrained

# The fast classifier setting every run here shares: tiny ViT, 32x32 inputs (a 4x4 grid of 8px patches).
FAST = ['--model', 'vit_tiny_patch8', '--input_size', '32', '--num_workers', '0', '--device', 'cpu',
        '--nb_classes', '4']
DEPTH, DIM = 4, 192
NEW_HEAD = {'head.weight', 'head.bias'}
NEW_FC_NORM = {'fc_norm.weight', 'fc_norm.bias'}

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason='torch.distributed with the gloo backend is not available')


def cls_argv(data, out, *extra):
    """A fast classification command line (main_finetune or main_linprobe): 1 epoch of 32 images / 8."""
    return ['--data_path', str(data), '--output_dir', str(out), *FAST, '--batch_size', '8', '--epochs', '1',
            '--warmup_epochs', '0', '--print_freq', '2', *extra]


def run(entry, argv):
    args = parse_args(entry.get_args_parser(), entry.DEMO_DEFAULTS, argv)
    return args, entry.main(args)


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def raises_one_line(message, entry, argv):
    """The entry point stops with a UserError whose single line matches `message`."""
    with pytest.raises(UserError, match=message) as info:
        run(entry, argv)
    assert '\n' not in str(info.value).strip()
    return str(info.value)


class NotAllowListed:
    """Module-level, so pickle could find it: the weights-only loader must still refuse it."""


def write_mae_checkpoint(path, prefix='', model='mae_vit_tiny_patch8', img_size=32, seed=0):
    """A pretraining checkpoint laid out like the released MAE files: encoder and decoder state under
    'model' (keys optionally prefixed by DDP's `module.` / torch.compile's `_orig_mod.`), the run's
    argparse.Namespace under 'args', and the epoch. Every tensor is random, so a value that was not loaded
    can't pass for one that was. Returns the unprefixed state dict."""
    names = models_milan.create_model(model, img_size=img_size, target='pixel').state_dict()
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen) for k, v in names.items()}
    assert {'patch_embed.proj.weight', 'cls_token', 'pos_embed', 'blocks.0.attn.qkv.weight', 'norm.weight',
            'decoder_embed.weight', 'mask_token', 'decoder_pos_embed', 'decoder_blocks.0.mlp.fc1.weight',
            'decoder_norm.weight', 'decoder_pred.weight'} <= set(state)
    mae_args = argparse.Namespace(model=model, input_size=img_size, mask_ratio=0.75, norm_pix_loss=True,
                                  batch_size=64, blr=1.5e-4)
    torch.save({'model': {prefix + k: v for k, v in state.items()}, 'args': mae_args, 'epoch': 399}, path)
    return state


@pytest.fixture(scope='module')
def pretrained(tiny_data, tmp_path_factory):
    """A pretraining checkpoint written by main_pretrain (pixel target, 1 epoch on the tiny data)."""
    out = tmp_path_factory.mktemp('pretrain')
    run(main_pretrain, pretrain_argv(tiny_data, out))
    return str(out / 'checkpoint-last.pth')


@pytest.fixture(scope='module')
def finetuned(tiny_data, pretrained, tmp_path_factory):
    """main_finetune for 1 epoch (4 iterations) from the pretraining checkpoint: its output folder."""
    out = tmp_path_factory.mktemp('finetune')
    run(main_finetune, cls_argv(tiny_data, out, '--finetune', pretrained))
    assert (out / 'checkpoint-best.pth').exists(), 'the first epoch must beat 0% to write a best checkpoint'
    return out


# 1. Released MAE-layout checkpoints --------------------------------------------------------------------

@pytest.mark.parametrize('prefix,global_pool', [
    ('', False), ('', True), ('module.', True), ('_orig_mod.', False), ('module._orig_mod.', True),
    ('_orig_mod.module.', True),
])
def test_mae_layout_checkpoint_loads_with_exactly_the_new_keys_missing(tmp_path, prefix, global_pool):
    path = str(tmp_path / 'mae_pretrain.pth')
    state = write_mae_checkpoint(path, prefix)
    # the plain weights-only loader refuses the pickled Namespace: the allow-list is what makes it load
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)

    model = models_vit.create_model('vit_tiny_patch8', 32, 4, global_pool=global_pool)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new = NEW_HEAD | (NEW_FC_NORM if global_pool else set())
    result = load_pretrained(model, path, new)

    assert set(result.missing_keys) == new
    # decoder, mask token and prefixes never reach the model; with global pooling timm's ViT has fc_norm
    # instead of norm, so the encoder's final norm is the only thing left over
    assert set(result.unexpected_keys) <= {'norm.weight', 'norm.bias'}
    assert bool(result.unexpected_keys) == global_pool
    loaded = model.state_dict()
    for key, value in loaded.items():
        if key in new:
            assert torch.equal(value, before[key]), key
        else:
            assert torch.equal(value, state[key]), key
    assert len(loaded) - len(new) == (2 + 2 + 12 * DEPTH + (0 if global_pool else 2))


def test_entry_points_build_their_models_from_a_mae_file(tmp_path):
    path = str(tmp_path / 'mae_pretrain.pth')
    state = write_mae_checkpoint(path, 'module.')
    ft = main_finetune.build_model(argparse.Namespace(model='vit_tiny_patch8', input_size=32, nb_classes=4,
                                                      global_pool=True, drop_path=0.1, finetune=path))
    lp = main_linprobe.build_model(argparse.Namespace(model='vit_tiny_patch8', input_size=32, nb_classes=4,
                                                      global_pool=False, finetune=path))
    for model in (ft, lp):
        for key, value in model.state_dict().items():
            if not key.startswith(('head', 'fc_norm')):
                assert torch.equal(value, state[key]), key
    # the new head: tiny weights, zero bias
    assert ft.head.weight.abs().max() < 1e-3 and not ft.head.bias.any()
    assert torch.equal(ft.fc_norm.weight, torch.ones(DIM)) and not ft.fc_norm.bias.any()


def test_pretrained_loading_refuses_unexpected_missing_keys_and_foreign_pickles(tmp_path):
    path = str(tmp_path / 'mae_pretrain.pth')
    write_mae_checkpoint(path)
    model = models_vit.create_model('vit_tiny_patch8', 32, 4, global_pool=True)
    with pytest.raises(UserError, match=r'does not fit this model \(missing fc_norm\.bias'):
        load_pretrained(model, path, NEW_HEAD)  # fc_norm is new with global pooling but not allowed here
    other = str(tmp_path / 'other.pth')
    torch.save({'model': {'cls_token': torch.zeros(1, 1, DIM)}, 'args': NotAllowListed()}, other)
    with pytest.raises(UserError, match='cannot read .*other.pth as a checkpoint'):
        load_pretrained(model, other, NEW_HEAD | NEW_FC_NORM)


# 2. Position-table resizing --------------------------------------------------------------------------

def test_position_table_is_resized_to_the_model_grid(tmp_path):
    path = str(tmp_path / 'mae_pretrain.pth')
    state = write_mae_checkpoint(path)  # input 32: a 4x4 grid
    model = models_vit.create_model('vit_tiny_patch8', 64, 4, global_pool=True)  # input 64: 8x8
    load_pretrained(model, path, NEW_HEAD | NEW_FC_NORM)

    table = model.pos_embed.detach()
    assert table.shape == (1, 1 + 8 * 8, DIM)
    assert torch.equal(table[:, :1], state['pos_embed'][:, :1])  # the class slot is not resized
    # the patch part: bicubic on the 2-D grid (row-major patches, channels last), as MAE's interpolation
    grid = state['pos_embed'][:, 1:].reshape(1, 4, 4, DIM).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 8), mode='bicubic', align_corners=False)
    torch.testing.assert_close(table[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 64, DIM), rtol=0, atol=1e-6)
    assert torch.equal(model.patch_embed.proj.weight, state['patch_embed.proj.weight'])
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)


# 3. Layer-wise lr decay ------------------------------------------------------------------------------

def expected_lr_scale(name, decay=0.65):
    if name in ('cls_token', 'pos_embed') or name.startswith('patch_embed.'):
        return decay ** (DEPTH + 1)
    if name.startswith('blocks.'):
        return decay ** (DEPTH - int(name.split('.')[1]))
    assert name.startswith(('norm.', 'fc_norm.', 'head.')), name
    return 1.0


@pytest.mark.parametrize('global_pool', [False, True], ids=['cls_token', 'global_pool'])
def test_layer_decay_groups(global_pool):
    model = models_vit.create_model('vit_tiny_patch8', 32, 4, global_pool=global_pool)
    args = argparse.Namespace(weight_decay=0.05, layer_decay=0.65, lr=1e-3)
    optimizer = main_finetune.build_optimizer(args, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []
    for group in optimizer.param_groups:
        for p in group['params']:
            name = names[id(p)]
            seen.append(name)
            assert group['lr_scale'] == pytest.approx(expected_lr_scale(name), rel=1e-12), name
            # decay on matrices only: none on biases, norms, the class token and the position table
            decays = name.endswith('.weight') and 'norm' not in name
            assert group['weight_decay'] == (0.05 if decays else 0.0), name
    assert sorted(seen) == sorted(n for n, _ in model.named_parameters())  # each parameter exactly once
    # spot checks of the formula
    scale = {names[id(p)]: g['lr_scale'] for g in optimizer.param_groups for p in g['params']}
    assert scale['patch_embed.proj.weight'] == pytest.approx(0.65 ** 5)
    assert scale['blocks.0.attn.qkv.weight'] == pytest.approx(0.65 ** 4)
    assert scale['blocks.3.mlp.fc2.bias'] == pytest.approx(0.65)
    assert scale['head.weight'] == 1.0

    set_lr(optimizer, 2e-3)
    for group in optimizer.param_groups:
        assert group['lr'] == pytest.approx(2e-3 * group['lr_scale'], rel=1e-12)
    assert {round(g['lr'] / 2e-3, 12) for g in optimizer.param_groups} == \
        {round(0.65 ** k, 12) for k in range(DEPTH + 2)}


def test_layer_decay_skips_frozen_parameters():
    model = models_vit.create_model('vit_tiny_patch8', 32, 4, global_pool=False)
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    groups = param_groups_layer_decay(model, 0.05, 0.65)
    assert sorted(len(g['params']) for g in groups) == [1, 1]
    assert all(g['lr_scale'] == 1.0 for g in groups)


# 4. LARS --------------------------------------------------------------------------------------------

def test_lars_step_by_hand():
    """Two steps (momentum carries over): a 2-D weight gets weight decay and the trust ratio, a 1-D bias plain
    momentum SGD; a weight that starts at zero takes its first step with a trust ratio of 1."""
    lr, wd, momentum, trust = 0.5, 0.1, 0.9, 0.02
    gen = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(3, 5, generator=gen, dtype=torch.float64))
    bias = nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64))
    zero = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    optimizer = LARS([weight, bias, zero], lr=lr, weight_decay=wd, momentum=momentum, trust_coefficient=trust)
    w, b, z = weight.detach().clone(), bias.detach().clone(), zero.detach().clone()
    mu_w, mu_b, mu_z = torch.zeros_like(w), torch.zeros_like(b), torch.zeros_like(z)

    def adapted(grad, value):
        update = torch.add(grad, value, alpha=wd)  # gradient + weight decay x weight
        ratio = trust * value.norm() / update.norm() if value.norm() > 0 else torch.tensor(1.0, dtype=grad.dtype)
        return ratio * update, ratio

    for step in range(2):
        g_w, g_b, g_z = (torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (w, b, z))
        weight.grad, bias.grad, zero.grad = g_w.clone(), g_b.clone(), g_z.clone()
        optimizer.step()

        update_w, ratio = adapted(g_w, w)
        assert not 0.5 < ratio < 2  # the adaptation matters: a step without it would differ
        mu_w = momentum * mu_w + update_w
        w = w - lr * mu_w
        mu_b = momentum * mu_b + g_b  # no decay, no ratio
        b = b - lr * mu_b
        update_z, ratio_z = adapted(g_z, z)
        assert (ratio_z == 1) == (step == 0)
        mu_z = momentum * mu_z + update_z
        z = z - lr * mu_z
        torch.testing.assert_close(weight.detach(), w, rtol=1e-14, atol=0)
        torch.testing.assert_close(bias.detach(), b, rtol=1e-14, atol=0)
        torch.testing.assert_close(zero.detach(), z, rtol=1e-14, atol=0)
        assert torch.equal(optimizer.state[bias]['mu'], mu_b)
    assert torch.equal(zero.detach(), z) and torch.equal(bias.detach(), b)


# 5. Linear probe: only the head trains ---------------------------------------------------------------

def test_linear_probe_step_leaves_the_encoder_bit_for_bit(tiny_data, tmp_path, pretrained, monkeypatch):
    built = {}

    def spy(args):
        model = build(args)
        built['model'], built['init'] = model, {k: v.clone() for k, v in model.state_dict().items()}
        return model
    build = main_linprobe.build_model
    monkeypatch.setattr(main_linprobe, 'build_model', spy)
    out = tmp_path / 'linprobe'
    run(main_linprobe, cls_argv(tiny_data, out, '--finetune', pretrained, '--blr', '50'))

    head = built['model'].head
    assert isinstance(head, nn.Sequential) and len(head) == 2
    assert isinstance(head[0], nn.BatchNorm1d) and not head[0].affine and isinstance(head[1], nn.Linear)
    assert (head[1].in_features, head[1].out_features) == (DIM, 4)
    for name, p in built['model'].named_parameters():
        assert p.requires_grad == name.startswith('head.'), name

    ckpt = load(out / 'checkpoint-last.pth')
    assert ckpt['kind'] == 'linprobe' and ckpt['epoch'] == 0
    state = ckpt['model']
    encoder_ckpt = {k: v for k, v in load(pretrained)['model'].items() if not k.startswith(('decoder', 'mask_token'))}
    encoder = {k: v for k, v in state.items() if not k.startswith('head.')}
    assert set(encoder) == set(encoder_ckpt)  # class-token probe: cls_token, pos_embed, patch_embed, blocks, norm
    for key, value in encoder.items():
        assert torch.equal(value, encoder_ckpt[key]), key
    assert set(state) - set(encoder) == {'head.0.running_mean', 'head.0.running_var', 'head.0.num_batches_tracked',
                                         'head.1.weight', 'head.1.bias'}
    assert not torch.equal(state['head.1.weight'], built['init']['head.1.weight'])
    assert not torch.equal(state['head.1.bias'], built['init']['head.1.bias'])
    assert int(state['head.0.num_batches_tracked']) == 4  # 32 images / batch 8, one epoch
    assert not torch.equal(state['head.0.running_mean'], built['init']['head.0.running_mean'])
    # the optimizer only ever held the head's weight and bias
    assert sum(len(g['params']) for g in ckpt['optimizer']['param_groups']) == 2


# 6. The demo fine-tune -------------------------------------------------------------------------------

def test_demo_fine_tune_beats_chance(tmp_path, monkeypatch, capsys):
    """The README's demo command (generated 4 x 64 training / 4 x 16 validation images at 64x64, tiny ViT)
    for 1 epoch instead of 10, from random initialisation (this working directory has no demo pretraining
    checkpoint). One epoch reaches 86-94% with seeds 0-3; chance is 25%."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / 'demo'
    args, stats = run(main_finetune, ['--epochs', '1', '--num_workers', '0', '--device', 'cpu',
                                      '--output_dir', str(out)])
    assert args.demo and args.model == 'vit_tiny_patch8' and args.input_size == 64 and args.nb_classes == 4
    assert 'training from random initialisation' in capsys.readouterr().out
    logged = [json.loads(line) for line in open(out / 'log.txt')]
    assert [s['epoch'] for s in logged] == [0]
    assert stats['acc1'] == logged[-1]['val_acc1'] > 50


# 7. Evaluation over 2 processes ----------------------------------------------------------------------

@pytest.fixture(scope='module')
def odd_data(tiny_data, tmp_path_factory):
    """The tiny data with 15 validation images (one removed): in batches of 4, rank 0 of 2 sees 8 and rank 1
    sees 7. A sampler that pads (DistributedSampler) would count 16."""
    data = tmp_path_factory.mktemp('odd') / 'data'
    shutil.copytree(tiny_data, data)
    os.remove(sorted(glob.glob(str(data / 'val' / 'disc' / '*')))[0])
    return data


def eval_argv(data, out, checkpoint, *extra):
    return ['--data_path', str(data), '--output_dir', str(out), *FAST, '--batch_size', '4', '--eval',
            '--resume', str(checkpoint), *extra]


def launch_probe(tmp, entry, argv):
    """`entry` (finetune or linprobe) under torchrun with 2 processes: what main() returned on each rank."""
    launch(tmp, ['torch.distributed.run'], os.path.join('tests', 'eval_probe.py'), [str(tmp / 'probe'), entry, *argv])
    records = [json.loads((tmp / 'probe' / f'rank{r}.json').read_text()) for r in range(NPROC)]
    for r, rec in enumerate(records):
        assert (rec['rank'], rec['world_size'], rec['distributed']) == (r, NPROC, True)
    assert records[0]['stats'] == records[1]['stats']  # all-reduced: both ranks hold the same numbers
    return records[0]['stats']


def assert_same_evaluation(stats, reference):
    assert (stats['acc1'], stats['acc5']) == (reference['acc1'], reference['acc5'])
    # the float32 loss sums are grouped differently over the two shards' batches: equal up to rounding
    assert stats['loss'] == pytest.approx(reference['loss'], rel=1e-6, abs=0)


@needs_gloo
def test_two_process_eval_equals_one_process(odd_data, finetuned, tmp_path):
    """main_finetune --eval of the fine-tuned checkpoint under torchrun and in one process."""
    argv = eval_argv(odd_data, tmp_path / 'eval', finetuned / 'checkpoint-best.pth')
    _, single = run(main_finetune, argv)
    hits = single['acc1'] * 15 / 100
    assert hits == pytest.approx(round(hits), abs=1e-9)  # counted over exactly 15 images
    assert_same_evaluation(launch_probe(tmp_path, 'finetune', argv), single)


@needs_gloo
def test_two_process_linprobe_evaluates_the_model_it_saves(odd_data, pretrained, tmp_path):
    """A 2-process linear probe (1 epoch, 2 x 4 iterations of 4 images): the evaluation after the epoch must
    be the one a single process gets from the checkpoint it saved."""
    out = tmp_path / 'linprobe'
    trained = launch_probe(tmp_path, 'linprobe', cls_argv(odd_data, out, '--finetune', pretrained,
                                                          '--batch_size', '4', '--blr', '50'))
    assert load(out / 'checkpoint-last.pth')['epoch'] == 0
    _, single = run(main_linprobe, eval_argv(odd_data, tmp_path / 'eval', out / 'checkpoint-last.pth'))
    assert_same_evaluation(trained, single)


# 8. Bad input ---------------------------------------------------------------------------------------

def test_missing_val_folder(tiny_data, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(os.path.join(tiny_data, 'train'), data / 'train')
    raises_one_line(f'no folder {data / "val"}: --data_path must hold val/<class>/<images>', main_finetune,
                    cls_argv(data, tmp_path / 'out'))


@pytest.mark.parametrize('entry', [main_finetune, main_linprobe], ids=['finetune', 'linprobe'])
def test_class_count_mismatch(tiny_data, tmp_path, entry):
    raises_one_line(r'train/ holds 4 classes but --nb_classes is 10; pass --nb_classes 4$', entry,
                    cls_argv(tiny_data, tmp_path / 'out', '--nb_classes', '10'))


def test_val_class_count_mismatch(tiny_data, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    shutil.rmtree(data / 'val' / 'square')
    raises_one_line(r'val/ holds 3 classes but --nb_classes is 4', main_finetune, cls_argv(data, tmp_path / 'out'))


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


def test_missing_finetune_file(tiny_data, tmp_path):
    raises_one_line('--finetune /nonexistent.pth: no such file', main_finetune,
                    cls_argv(tiny_data, tmp_path / 'out', '--finetune', '/nonexistent.pth'))


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


@pytest.mark.parametrize('entry', [main_finetune, main_linprobe], ids=['finetune', 'linprobe'])
def test_eval_needs_resume(tiny_data, tmp_path, entry):
    raises_one_line('--eval needs --resume CHECKPOINT', entry, cls_argv(tiny_data, tmp_path / 'out', '--eval'))


@pytest.mark.parametrize('mode', [[], ['--eval']], ids=['train', 'eval'])
def test_resume_from_a_checkpoint_of_another_kind(tiny_data, tmp_path, pretrained, mode):
    raises_one_line(r"is not a finetune checkpoint of this repository \(found 'pretrain'\)", main_finetune,
                    cls_argv(tiny_data, tmp_path / 'out', '--resume', pretrained, *mode))
    mae = str(tmp_path / 'mae_pretrain.pth')
    write_mae_checkpoint(mae)
    raises_one_line('mae_pretrain.pth is a released MAE/MILAN checkpoint, not a training state to resume: pass '
                    'it to --finetune', main_finetune,
                    cls_argv(tiny_data, tmp_path / 'out', '--resume', mae, *mode))


# 9. --eval and resume ----------------------------------------------------------------------------------

def test_eval_of_the_best_checkpoint(tiny_data, finetuned, tmp_path, capsys):
    best_path = str(finetuned / 'checkpoint-best.pth')
    best = load(best_path)
    assert best['kind'] == 'finetune' and best['epoch'] == 0
    logged = [json.loads(line) for line in open(finetuned / 'log.txt')]
    capsys.readouterr()
    _, stats = run(main_finetune, cls_argv(tiny_data, tmp_path / 'eval', '--eval', '--resume', best_path))
    # the same weights on the same images as the evaluation after training: the same numbers
    assert stats['acc1'] == best['best_acc1'] == logged[0]['val_acc1']
    assert (stats['acc5'], stats['loss']) == (logged[0]['val_acc5'], logged[0]['val_loss'])
    out = capsys.readouterr().out
    assert f'{best_path} on 16 images: top-1 {stats["acc1"]:.2f}% top-5 {stats["acc5"]:.2f}%' in out
    assert not glob.glob(str(tmp_path / 'eval' / 'checkpoint-*.pth'))  # --eval trains and saves nothing


def test_resume_runs_only_the_remaining_epoch_and_carries_best(tiny_data, finetuned, tmp_path, capsys):
    out = tmp_path / 'ft'
    shutil.copytree(finetuned, out)
    first_log = (out / 'log.txt').read_text()
    best_bytes = (out / 'checkpoint-best.pth').read_bytes()
    # an unbeatable best in the checkpoint: a resumed run that forgot it would write a new best
    last = load(out / 'checkpoint-last.pth')
    assert last['epoch'] == 0
    last['best_acc1'] = 100.0
    torch.save(last, out / 'checkpoint-last.pth')

    capsys.readouterr()
    _, stats = run(main_finetune, cls_argv(tiny_data, out, '--epochs', '2'))
    log = capsys.readouterr().out
    assert 'resumed from' in log and 'epoch 0 [' not in log and 'epoch 1 [' in log
    lines = (out / 'log.txt').read_text()
    assert lines.startswith(first_log)
    assert [json.loads(line)['epoch'] for line in lines.splitlines()] == [0, 1]
    resumed = load(out / 'checkpoint-last.pth')
    assert resumed['epoch'] == 1 and resumed['best_acc1'] == 100.0
    assert (out / 'checkpoint-best.pth').read_bytes() == best_bytes
    # the optimizer went on from the saved state: 4 + 4 AdamW steps
    assert {float(s['step']) for s in resumed['optimizer']['state'].values()} == {8.0}
    assert stats['acc1'] == json.loads(lines.splitlines()[-1])['val_acc1']


# 10. Our weights in timm ----------------------------------------------------------------------------

def test_finetuned_weights_load_strictly_into_timm(finetuned):
    """timm's own vit_tiny recipe, resized (8px patches, 4 blocks, 32px input) with global_pool='avg'."""
    state = load(finetuned / 'checkpoint-best.pth')['model']
    reference = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=8, depth=DEPTH,
                                  num_classes=4, global_pool='avg')
    untrained = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=8, depth=DEPTH,
                                  num_classes=4, global_pool='avg')
    reference.load_state_dict(state, strict=True)
    ours = models_vit.create_model('vit_tiny_patch8', 32, 4, global_pool=True)
    ours.load_state_dict(state, strict=True)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = reference.eval()(x)
        assert torch.equal(logits, ours.eval()(x))
        assert not torch.allclose(logits, untrained.eval()(x))  # the weights really came from the file
