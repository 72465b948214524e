"""util/pretrained.py: reading weight files, and loading MAE-layout checkpoints into the classifier ViT."""
import argparse
import pickle

import pytest
import torch
import torch.nn.functional as F

import models_milan
import models_vit
from util.errors import UserError
from util.pretrained import load_pretrained


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
    `ln2` the pooled one), `head.fc.*`; the pretraining file's decoder (`neck.*`) and CLIP teacher
    (`target_generator.*`) dropped by name. The same features as the same weights in our layout."""
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
    assert 'MMPretrain layout' in log and ('neck.*' in log and 'target_generator.*' in log) != finetuned
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(target.eval()(x), source.eval()(x), rtol=0, atol=0)
    mm['backbone.layers.0.gamma1'] = torch.ones(192)  # layer scale: a ViT this code does not build
    torch.save({'state_dict': mm}, tmp_path / 'other.pth')
    with pytest.raises(UserError, match='backbone.layers.0.gamma1 has no counterpart') as e:
        load_pretrained(target, str(tmp_path / 'other.pth'), allowed_missing=())
    assert '\n' not in str(e.value)
