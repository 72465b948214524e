"""util/pretrained.py: reading weight files, and loading MAE-layout checkpoints into the classifier ViT."""
import argparse
import collections
import contextlib
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models_milan
import models_vit
from models_clip import build_random_teacher
from util.errors import UserError
from util.pretrained import Inert, checkpoint_epoch, load_pretrained, model_state, read_checkpoint


DEPTH, DIM = 4, 192
NEW_HEAD = {'head.weight', 'head.bias'}
NEW_FC_NORM = {'fc_norm.weight', 'fc_norm.bias'}


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


@pytest.mark.parametrize('content,reason', [
    ('truncated', 'a damaged or incomplete zip archive'),
    (b'hello, this is a text file\n', 'not a pickle or zip archive that torch wrote'),
    (b'', 'an empty file'),
])
def test_unreadable_weight_files_say_why_in_our_words(tmp_path, content, reason):
    """No stray torch text: a truncated --finetune file's message used to end mid-sentence in miniz's, and a
    text file given as --clip_model added "(KeyError: 101)"."""
    from models_clip import load_clip_teacher
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


def mmpretrain_name(key):
    """Our (timm's) key as MMPretrain's VisionTransformer names it: written out here, independently of the code."""
    block = key.split('.')
    if key.startswith('blocks.'):
        i, rest = block[1], '.'.join(block[2:])
        rest = {'norm1': 'ln1', 'norm2': 'ln2', 'mlp.fc1': 'ffn.layers.0.0', 'mlp.fc2': 'ffn.layers.1'}.get(
            rest.rsplit('.', 1)[0], rest.rsplit('.', 1)[0]) + '.' + rest.rsplit('.', 1)[1]
        return f'backbone.layers.{i}.{rest}'
    if key.startswith('head.'):
        return 'head.fc.' + block[1]
    return 'backbone.' + {'patch_embed.proj': 'patch_embed.projection', 'norm': 'ln1', 'fc_norm': 'ln2'}.get(
        key.rsplit('.', 1)[0], key.rsplit('.', 1)[0]) + ('.' + key.rsplit('.', 1)[1] if '.' in key else '')


@pytest.mark.parametrize('kind', ['pretrain', 'finetune'])
def test_mmpretrain_checkpoints_load_with_every_key_accounted_for(tmp_path, kind, capsys):
    """MMPretrain's MILAN files: MMEngine's {'meta', 'state_dict'} wrapping, `backbone.*` (`ln1` the final norm,
    `ln2` the pooled one), `head.fc.*`; the pretraining file's decoder (`neck.*`) mapped and then left out of a
    classifier, its CLIP teacher (`target_generator.*`) dropped by name. The same features as the same weights in
    our layout."""
    finetuned = kind == 'finetune'
    torch.manual_seed(0)
    source = models_vit.create_model('vit_tiny_patch8', 32, num_classes=4 if finetuned else 0, global_pool=finetuned)
    for p in source.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    mm = {mmpretrain_name(k): v for k, v in source.state_dict().items()}
    assert 'backbone.layers.3.ffn.layers.0.0.weight' in mm and 'backbone.patch_embed.projection.bias' in mm
    if not finetuned:
        mm.update({'neck.mask_token': torch.zeros(1, 1, 16), 'neck.decoder_blocks.0.attn.q.weight': torch.zeros(4, 4),
                   'neck.ln1.weight': torch.ones(16), 'target_generator.tokenizer.visual.proj': torch.zeros(8, 4)})
    torch.save({'meta': {'epoch': 400, 'mmengine_version': '0.7.0'}, 'state_dict': mm}, tmp_path / 'mm.pth')
    target = models_vit.create_model('vit_tiny_patch8', 32, num_classes=4 if finetuned else 0, global_pool=finetuned)
    load_pretrained(target, str(tmp_path / 'mm.pth'), allowed_missing=())
    log = capsys.readouterr().out
    assert 'MMPretrain layout' in log
    assert ('3 of them the decoder, from neck.*' in log and '1 target_generator.* (the frozen CLIP teacher)' in log) \
        != finetuned
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(target.eval()(x), source.eval()(x), rtol=0, atol=0)
    mm['backbone.layers.0.gamma1'] = torch.ones(192)  # layer scale: a ViT this code does not build
    torch.save({'state_dict': mm}, tmp_path / 'other.pth')
    with pytest.raises(UserError, match='backbone.layers.0.gamma1 has no counterpart') as e:
        load_pretrained(target, str(tmp_path / 'other.pth'), allowed_missing=())
    assert '\n' not in str(e.value)


# --- MMPretrain's pretraining decoders and MMEngine's files -------------------------------------------------------

def mmpretrain_milan_name(key):
    """Our MilanViT's key as MMPretrain's MILAN/MAE pretraining model names it, written out independently of the
    code: the encoder under `backbone.` (mmpretrain_name), the decoder under `neck.` with MMPretrain's transformer
    layer names (`ln1`, `ln2`, `ffn.layers.0.0`, `ffn.layers.1`) and its final norm as `ln1`."""
    if not key.startswith(('decoder_', 'mask_token')):
        return mmpretrain_name(key)
    parts = key.split('.')
    if key.startswith('decoder_blocks.'):
        layer = '.'.join(parts[2:-1])
        layer = {'norm1': 'ln1', 'norm2': 'ln2', 'mlp.fc1': 'ffn.layers.0.0', 'mlp.fc2': 'ffn.layers.1'}.get(layer,
                                                                                                           layer)
        return f'neck.decoder_blocks.{parts[1]}.{layer}.{parts[-1]}'
    if key.startswith('decoder_norm.'):
        return 'neck.ln1.' + parts[-1]
    return 'neck.' + key


def perturbed_milan(prompting=True, seed=0):
    """Our tiny MilanViT (32 px, CLIP target of 64-d with the prompting decoder, pixels with MAE's) with every
    weight moved off its initial value, so that no tensor loaded in the wrong place can pass for the right one."""
    model = models_milan.create_model('mae_vit_tiny_patch8', img_size=32, target='clip' if prompting else 'pixel',
                                      target_dim=64, prompting_decoder=prompting)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


@contextlib.contextmanager
def fake_mmengine(**extra):
    """MMEngine's logging classes as modules under its names in sys.modules, removed again on exit (as on a machine
    without mmengine). Yields the module namespace: MessageHub, HistoryBuffer and `extra` attributes."""
    names = ['mmengine', 'mmengine.logging', 'mmengine.logging.message_hub', 'mmengine.logging.history_buffer']
    saved = {n: sys.modules.get(n) for n in names}
    modules = {n: types.ModuleType(n) for n in names}

    class HistoryBuffer:
        def __init__(self, values):
            self._log_history, self._count_history, self.max_length = np.array(values), np.ones(len(values)), 100

    class MessageHub:
        def __init__(self):
            self.log_scalars = collections.OrderedDict(
                {'train/loss': HistoryBuffer([0.8, 0.7]), 'train/lr': HistoryBuffer([1e-4, 2e-4])})
            self.runtime_info = collections.OrderedDict(epoch=400, iter=125200, eta=np.float64(12.5))

    hub = 'mmengine.logging.message_hub'
    for module, name, value in (('mmengine.logging.history_buffer', 'HistoryBuffer', HistoryBuffer),
                                (hub, 'MessageHub', MessageHub), *((hub, n, v) for n, v in extra.items())):
        value.__module__, value.__qualname__ = module, name  # where pickle looks them up
        setattr(modules[module], name, value)
    sys.modules.update(modules)
    try:
        yield types.SimpleNamespace(MessageHub=MessageHub, HistoryBuffer=HistoryBuffer, **extra)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def mmengine_checkpoint(state_dict, hub, epoch=400):
    """What MMEngine's runner saves (Runner.save_checkpoint): meta with the count of finished epochs, the model's
    state dict, the message hub, the optimizer and the schedulers."""
    return {'meta': {'epoch': epoch, 'iter': 125200, 'cfg': "model = dict(type='MILAN')", 'seed': 0,
                     'mmengine_version': '0.7.3', 'dataset_meta': {'classes': ('a', 'b')}},
            'state_dict': state_dict, 'message_hub': hub,
            'optimizer': {'state': {0: {'step': torch.tensor(3.0), 'exp_avg': torch.zeros(3)}},
                          'param_groups': [{'lr': 1e-4, 'betas': (0.9, 0.95), 'params': [0]}]},
            'param_schedulers': [{'by_epoch': True, 'last_step': 399, 'eta_min': 0.0}]}


def mmpretrain_clip_generator(output_dim):
    """What MMPretrain's CLIPGenerator holds as `target_generator.tokenizer.*`: a whole OpenAI-layout CLIP, here the
    tiny random teacher that a `--clip_model random` run of the 32 px test model uses (8 px patches on a 4x4 grid,
    seed 0) as its `visual.*` tower, beside a token embedding and text block standing for the text tower."""
    visual = build_random_teacher(8, 4, output_dim=output_dim).state_dict()
    tower = {f'visual.{k}': v.clone() for k, v in visual.items()}
    tower.update({'token_embedding.weight': torch.full((10, 8), 0.5), 'ln_final.weight': torch.ones(8),
                  'transformer.resblocks.0.attn.in_proj_weight': torch.full((24, 8), 0.25)})
    return {f'target_generator.tokenizer.{k}': v for k, v in tower.items()}


def write_mmpretrain_milan(path, model, epoch=400):
    """An MMPretrain MILAN (or MAE) pretraining checkpoint of `model`'s weights, as MMEngine writes it: the state
    dict in MMPretrain's names plus, for MILAN (a CLIP target), its CLIP teacher (mmpretrain_clip_generator), a
    message hub of MMEngine objects (their classes gone again when this returns). Returns the MMPretrain state
    dict."""
    mm = {mmpretrain_milan_name(k): v.clone() for k, v in model.state_dict().items()}
    assert len(mm) == len(model.state_dict())
    if model.target == 'clip':
        mm.update(mmpretrain_clip_generator(model.decoder_pred.out_features))
    with fake_mmengine() as mmengine:
        torch.save(mmengine_checkpoint(mm, mmengine.MessageHub()), path)
    return mm


def mmpretrain_decode(mm, latent, ids_keep, ids_dump, heads):
    """MMPretrain's decoder forward on its own state dict, written here step by step as its source runs it
    (MILANPretrainDecoder with prompting layers when the file has `attn.q`, else MAEPretrainDecoder): embed,
    unshuffle with ids_restore, add positions; MILAN splits visible tokens (kept fixed) from mask tokens, whose
    queries come from `q` and whose keys/values from `kv` over [visible ; ln1(mask)] in image order. [B, 1+L, out]."""
    def linear(x, name):
        return F.linear(x, mm[name + '.weight'], mm[name + '.bias'])

    def norm(x, name):
        return F.layer_norm(x, x.shape[-1:], mm[name + '.weight'], mm[name + '.bias'], eps=1e-6)

    def attend(q, k, v):
        b, nq, d = q.shape
        q, k, v = (t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2) for t in (q, k, v))
        weights = (q @ k.transpose(-2, -1) * (d // heads) ** -0.5).softmax(-1)
        return (weights @ v).transpose(1, 2).reshape(b, nq, d)

    def take(x, ids):
        return torch.gather(x, 1, ids[..., None].expand(-1, -1, x.shape[-1]))

    ids_restore = torch.cat([ids_keep, ids_dump], 1).argsort(1)
    x = linear(latent, 'neck.decoder_embed')
    b, d = x.shape[0], x.shape[-1]
    mask_tokens = mm['neck.mask_token'].expand(b, ids_dump.shape[1], d)
    x = torch.cat([x[:, :1], take(torch.cat([x[:, 1:], mask_tokens], 1), ids_restore)], 1)
    x = x + mm['neck.decoder_pos_embed']
    depth = len({k.split('.')[2] for k in mm if k.startswith('neck.decoder_blocks.')})
    if 'neck.decoder_blocks.0.attn.q.weight' in mm:
        visible, m = torch.cat([x[:, :1], take(x[:, 1:], ids_keep)], 1), take(x[:, 1:], ids_dump)
        for i in range(depth):
            p = f'neck.decoder_blocks.{i}'
            h = norm(m, p + '.ln1')
            full = torch.cat([visible[:, :1], take(torch.cat([visible[:, 1:], h], 1), ids_restore)], 1)
            k, v = linear(full, p + '.attn.kv').chunk(2, dim=-1)
            m = m + linear(attend(linear(h, p + '.attn.q'), k, v), p + '.attn.proj')
            m = m + linear(F.gelu(linear(norm(m, p + '.ln2'), p + '.ffn.layers.0.0')), p + '.ffn.layers.1')
        x = torch.cat([visible[:, :1], take(torch.cat([visible[:, 1:], m], 1), ids_restore)], 1)
    else:
        for i in range(depth):
            p = f'neck.decoder_blocks.{i}'
            q, k, v = linear(norm(x, p + '.ln1'), p + '.attn.qkv').chunk(3, dim=-1)
            x = x + linear(attend(q, k, v), p + '.attn.proj')
            x = x + linear(F.gelu(linear(norm(x, p + '.ln2'), p + '.ffn.layers.0.0')), p + '.ffn.layers.1')
    return linear(norm(x, 'neck.ln1'), 'neck.decoder_pred')


@pytest.mark.parametrize('prompting', [True, False], ids=['milan', 'mae'])
def test_mmpretrain_decoder_maps_to_ours_with_every_key_accounted_for(tmp_path, prompting, capsys):
    """An MMEngine file of MMPretrain's MILAN (prompting decoder, separate q and kv) or MAE (qkv) pretraining: read
    safely, every backbone and neck key in our MilanViT's names (identical tensors, nothing missing or extra),
    the teacher dropped by name; our decoder with those weights computes what MMPretrain's computes."""
    source = perturbed_milan(prompting)
    path = tmp_path / 'milan_mmpretrain.pth'
    mm = write_mmpretrain_milan(path, source)
    assert 'mmengine' not in sys.modules
    ckpt = read_checkpoint(str(path))
    state = model_state(ckpt, str(path))
    log = capsys.readouterr().out
    ours = source.state_dict()
    assert set(state) == set(ours)
    for key, value in ours.items():
        assert torch.equal(state[key], value), key
    decoder = sum(k.startswith(('decoder_', 'mask_token')) for k in ours)
    teacher = sum(k.startswith('target_generator.') for k in mm)
    assert (teacher > 0) == prompting  # MILAN's file carries its teacher, MAE's has none
    assert f'{len(ours)} tensors in our names ({decoder} of them the decoder, from neck.*)' in log
    assert (f'dropped {teacher} target_generator.* (the frozen CLIP teacher)' in log) == prompting
    assert checkpoint_epoch(ckpt) == 399  # MMEngine's 400 finished epochs, counted from 0 as ours

    loaded = models_milan.create_model('mae_vit_tiny_patch8', img_size=32, target='clip' if prompting else 'pixel',
                                       target_dim=64, prompting_decoder=prompting).eval()
    loaded.load_state_dict(state)  # strict
    gen = torch.Generator().manual_seed(1)
    latent = torch.randn(2, 1 + 4, 192, generator=gen)
    ids = torch.stack([torch.randperm(16, generator=gen) for _ in range(2)])
    with torch.no_grad():
        ours_out = loaded.forward_decoder(latent, ids)
        theirs = mmpretrain_decode(mm, latent, ids[:, :4], ids[:, 4:], heads=4)
    assert ours_out.shape == theirs.shape == (2, 17, 64 if prompting else 192)
    torch.testing.assert_close(ours_out, theirs, rtol=1e-5, atol=1e-5)
    # the check has teeth: kv's two halves swapped (values taken for keys) computes something else
    if prompting:
        swapped = dict(mm)
        for name in ('weight', 'bias'):
            k, v = mm[f'neck.decoder_blocks.0.attn.kv.{name}'].chunk(2)
            swapped[f'neck.decoder_blocks.0.attn.kv.{name}'] = torch.cat([v, k])
        wrong = mmpretrain_decode(swapped, latent, ids[:, :4], ids[:, 4:], heads=4)
        assert (wrong - ours_out).abs().max() > 1e-3


def test_mmpretrain_necks_that_are_no_decoder_of_ours(tmp_path, capsys):
    """The linear probe's BatchNorm neck is dropped by name; a neck with a key that is neither MILAN's nor MAE's
    decoder is dropped whole (never half a decoder), the encoder still loading for fine-tuning."""
    source = perturbed_milan()
    mm = {mmpretrain_milan_name(k): v for k, v in source.state_dict().items()}
    probe = {k: v for k, v in mm.items() if k.startswith('backbone.')}
    probe.update({'neck.bn.running_mean': torch.zeros(192), 'neck.bn.running_var': torch.ones(192),
                  'neck.bn.num_batches_tracked': torch.tensor(5), 'head.layers.head.weight': torch.randn(4, 192),
                  'head.layers.head.bias': torch.randn(4)})
    torch.save({'state_dict': probe}, tmp_path / 'probe.pth')
    state = model_state(read_checkpoint(str(tmp_path / 'probe.pth')), 'probe.pth')
    assert not any(k.startswith(('decoder_', 'mask_token', 'neck')) for k in state)
    assert torch.equal(state['head.weight'], probe['head.layers.head.weight'])
    assert "3 neck.bn.* (the linear probe's BatchNorm statistics" in capsys.readouterr().out

    mm['neck.decoder_blocks.0.attn.relative_position_bias_table'] = torch.zeros(49, 4)
    torch.save({'state_dict': mm}, tmp_path / 'other.pth')
    state = model_state(read_checkpoint(str(tmp_path / 'other.pth')), 'other.pth')
    assert not any(k.startswith(('decoder_', 'mask_token', 'neck')) for k in state)
    decoder = sum(k.startswith('neck.') for k in mm)
    assert (f"dropped {decoder} neck.* (not MILAN's or MAE's decoder: "
            f"neck.decoder_blocks.0.attn.relative_position_bias_table") in capsys.readouterr().out
    model = models_vit.create_model('vit_tiny_patch8', 32, 4, global_pool=False)
    assert set(load_pretrained(model, str(tmp_path / 'other.pth'), NEW_HEAD).missing_keys) == NEW_HEAD


def test_mmengine_objects_come_back_inert_without_mmengine(tmp_path):
    """MMEngine's message hub (HistoryBuffers of NumPy arrays, NumPy scalars) refuses torch's weights-only loader;
    it is read as Inert stand-ins, with mmengine neither installed nor imported, and the weights intact."""
    weights = {'backbone.cls_token': torch.randn(1, 1, 8)}
    path = tmp_path / 'epoch_400.pth'
    with fake_mmengine() as mmengine:
        torch.save(mmengine_checkpoint(weights, mmengine.MessageHub()), path)
    with pytest.raises(pickle.UnpicklingError, match='mmengine.logging.message_hub.MessageHub'):
        torch.load(path, weights_only=True)  # the plain safe loader refuses it
    ckpt = read_checkpoint(str(path))
    assert 'mmengine' not in sys.modules
    assert torch.equal(ckpt['state_dict']['backbone.cls_token'], weights['backbone.cls_token'])
    assert ckpt['meta']['epoch'] == 400 and torch.equal(ckpt['optimizer']['state'][0]['exp_avg'], torch.zeros(3))
    hub = ckpt['message_hub']
    assert isinstance(hub, Inert) and repr(hub) == '<mmengine.logging.message_hub.MessageHub, not loaded>'
    loss = hub.state['log_scalars']['train/loss']
    assert isinstance(loss, Inert) and loss.pickled_as == 'mmengine.logging.history_buffer.HistoryBuffer'
    assert isinstance(loss.state['_log_history'], Inert)  # a NumPy array, not rebuilt
    assert hub.state['runtime_info']['iter'] == 125200


def test_mmengine_like_code_never_runs_even_when_importable(tmp_path):
    """With classes of those names importable (mmengine installed), reading still runs none of their code: no
    __setstate__, no function a pickle names to call. A global of any other package is refused in one line."""
    calls = []

    def touch(marker):
        open(marker, 'w').close()

    class Trigger:
        def __reduce__(self):
            return touch, (str(tmp_path / 'ran'),)

    with fake_mmengine(touch=touch, Trigger=Trigger) as mmengine:
        mmengine.MessageHub.__setstate__ = lambda self, state: calls.append(state)
        path = tmp_path / 'hub.pth'
        torch.save(mmengine_checkpoint({'w': torch.ones(2)}, {'hub': mmengine.MessageHub(), 'hook': Trigger()}), path)
        ckpt = read_checkpoint(str(path))
        assert not isinstance(ckpt['message_hub']['hub'], mmengine.MessageHub)
    assert calls == [] and not (tmp_path / 'ran').exists()
    assert repr(ckpt['message_hub']['hook']) == '<mmengine.logging.message_hub.touch, not loaded>'

    class Payload:
        def __reduce__(self):
            return os.system, ('true',)

    with fake_mmengine() as mmengine:
        torch.save(mmengine_checkpoint({'w': torch.ones(2)}, [mmengine.MessageHub(), Payload()]), path)
    with pytest.raises(UserError, match=r'as a checkpoint \(it holds objects the safe loader refuses: posix\.system\); '
                                        r'pass a file of weights') as error:
        read_checkpoint(str(path))
    assert '\n' not in str(error.value)


def test_checkpoint_epoch_counts_from_zero():
    assert checkpoint_epoch({'epoch': 0}) == 0 and checkpoint_epoch({'epoch': 7, 'resume_iter': 3}) == 7
    assert checkpoint_epoch({'meta': {'epoch': 400}}) == 399 and checkpoint_epoch({'meta': {'epoch': 0}}) is None
    assert checkpoint_epoch({'model': {}}) is None and checkpoint_epoch({'epoch': None, 'meta': 'x'}) is None
