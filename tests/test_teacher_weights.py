"""util.teacher_weights: reading --teacher_weights files (timm, open_clip, safetensors, SLIP) and SLIP's conversion."""
import argparse
import datetime

import pytest
import timm
import torch
from safetensors.torch import save_file

from util.errors import UserError
from util.teacher_weights import from_slip, is_slip, read_teacher_weights


def state(seed=0):
    """A small state dict with tensors of several shapes and dtypes."""
    g = torch.Generator().manual_seed(seed)
    return {'cls_token': torch.randn(1, 1, 8, generator=g), 'blocks.0.attn.qkv.weight': torch.randn(24, 8, generator=g),
            'norm.bias': torch.randn(8, generator=g), 'steps': torch.tensor(3, dtype=torch.int64)}


def assert_same(got, expected):
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def one_line_error(path, match):
    with pytest.raises(UserError, match=match) as e:
        read_teacher_weights(str(path))
    assert '\n' not in str(e.value) and str(path) in str(e.value)
    return str(e.value)


@pytest.mark.parametrize('wrap', ['bare', 'state_dict', 'model', 'module'])
def test_wrappers(wrap, tmp_path):
    """A bare state dict, and one wrapped in {'state_dict'|'model'|'module': ...} next to non-tensor entries, read
    as the same tensors; the entries beside the weights are not among them."""
    sd, path = state(), tmp_path / 'weights.pth'
    torch.save(sd if wrap == 'bare' else {wrap: sd, 'epoch': 3, 'optimizer': {'lr': 0.1}}, path)
    assert_same(read_teacher_weights(str(path)), sd)


@pytest.mark.parametrize('prefix', ['module.', '_orig_mod.', 'module._orig_mod.'])
def test_wrapper_prefixes(prefix, tmp_path):
    """DDP's `module.` and torch.compile's `_orig_mod.` prefixes (also both) are stripped from every key."""
    sd, path = state(), tmp_path / 'weights.pth'
    torch.save({'state_dict': {prefix + k: v for k, v in sd.items()}}, path)
    assert_same(read_teacher_weights(str(path)), sd)


def test_bare_dict_keeps_only_tensors(tmp_path):
    """Non-tensor values at the top level of a bare dict are dropped, the tensors kept."""
    sd, path = state(), tmp_path / 'weights.bin'
    torch.save({**sd, 'epoch': 1, 'name': 'x'}, path)
    assert_same(read_teacher_weights(str(path)), sd)


def test_safetensors(tmp_path):
    """A .safetensors file reads as its tensors (prefixes stripped too)."""
    sd, path = state(), tmp_path / 'model.safetensors'
    save_file({'module.' + k: v for k, v in sd.items()}, str(path))
    assert_same(read_teacher_weights(str(path)), sd)


def test_pickled_namespace_alongside(tmp_path):
    """A checkpoint with its training args pickled as an argparse.Namespace (SLIP's, MAE's) reads with the safe
    loader; only the tensors come back."""
    sd, path = state(), tmp_path / 'checkpoint_best.pt'
    torch.save({'state_dict': {'module.' + k: v for k, v in sd.items()}, 'epoch': 24, 'best_acc1': 40.0,
                'args': argparse.Namespace(model='SLIP_VITB16', lr=3e-3)}, path)
    assert_same(read_teacher_weights(str(path)), sd)


def test_unsafe_pickle_is_refused(tmp_path):
    """A pickle holding other objects than tensors and a Namespace is refused by the weights-only loader in one line,
    never suggesting weights_only=False."""
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': state(), 'saved': datetime.date(2024, 1, 1)}, path)
    msg = one_line_error(path, 'cannot read .* as a checkpoint')
    assert 'weights_only' not in msg


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_truncated_file(suffix, tmp_path):
    """A file cut short (an interrupted download) is a one-line UserError, for torch and safetensors files."""
    full, cut = tmp_path / f'full{suffix}', tmp_path / f'cut{suffix}'
    sd = state()
    torch.save(sd, full) if suffix == '.pth' else save_file(sd, str(full))
    data = full.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    one_line_error(cut, 'cannot read .*(truncated|download)')


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_garbage_file(suffix, tmp_path):
    """An HTML page saved instead of the weights, and an empty file, are one-line UserErrors."""
    path = tmp_path / f'weights{suffix}'
    path.write_text('<!DOCTYPE html><html><body>404 Not Found</body></html>\n' * 20)
    one_line_error(path, 'cannot read')
    path.write_bytes(b'')
    one_line_error(path, 'cannot read')


def test_missing_file(tmp_path):
    one_line_error(tmp_path / 'nope.pth', 'no such file')


@pytest.mark.parametrize('content', [{'epoch': 1, 'args': argparse.Namespace(lr=1.0)}, {'state_dict': {}}, {}])
def test_file_without_tensors(content, tmp_path):
    """A checkpoint dict with no tensors in it (metadata only, an empty state dict) is refused in one line."""
    path = tmp_path / 'meta.pth'
    torch.save(content, path)
    one_line_error(path, 'holds no tensors; pass a timm, open_clip or SLIP weight file')


def test_not_a_dict(tmp_path):
    """A file holding a bare tensor or list is no weight file."""
    path = tmp_path / 'tensor.pth'
    torch.save([torch.zeros(2)], path)
    one_line_error(path, 'holds a list')


def slip_state(width=64, dim=32):
    """A stripped SLIP state dict: timm ViT keys under `visual.`, the bare image projection, the text tower and
    SimCLR head."""
    vit = timm.create_model('vit_base_patch16_224', pretrained=False, num_classes=0, img_size=32, patch_size=8,
                            embed_dim=width, depth=1, num_heads=2)
    g = torch.Generator().manual_seed(0)
    sd = {f'visual.{k}': v for k, v in vit.state_dict().items()}
    sd.update({'image_projection': torch.randn(width, dim, generator=g), 'text_projection': torch.randn(width, dim),
               'logit_scale': torch.tensor(2.6), 'token_embedding.weight': torch.randn(100, width),
               'transformer.resblocks.0.attn.in_proj_weight': torch.randn(3 * width, width),
               'image_mlp.layer1.weight': torch.randn(128, width), 'positional_embedding': torch.randn(8, width)})
    return vit, sd


def test_is_slip():
    """SLIP is told by the bare image projection beside a timm ViT under visual.; OpenAI/open_clip CLIPs (visual.
    class_embedding, visual.proj), open_clip timm trunks and plain timm ViTs are not SLIP."""
    vit, sd = slip_state()
    assert is_slip(sd)
    assert not is_slip(vit.state_dict())
    assert not is_slip({k: v for k, v in sd.items() if k != 'image_projection'})
    openai = {'visual.class_embedding': torch.zeros(64), 'visual.proj': torch.zeros(64, 32),
              'visual.conv1.weight': torch.zeros(64, 3, 8, 8)}
    assert not is_slip(openai)
    trunk = {'visual.trunk.cls_token': torch.zeros(1, 1, 64), 'visual.head.proj.weight': torch.zeros(32, 64)}
    assert not is_slip(trunk)


def test_from_slip():
    """from_slip keeps the image tower's timm keys, makes the image projection the head (transposed, zero bias, same
    dtype) and drops the text tower and SimCLR head; the result loads strictly into the timm ViT with a 32-way head,
    whose output is then SLIP's visual(x) @ image_projection."""
    vit, sd = slip_state()
    out = from_slip(sd)
    assert set(out) == {*vit.state_dict(), 'head.weight', 'head.bias'}
    projection = sd['image_projection']
    assert out['head.weight'].shape == (32, 64) and out['head.weight'].is_contiguous()
    assert torch.equal(out['head.weight'], projection.t())
    assert torch.equal(out['head.bias'], torch.zeros(32)) and out['head.bias'].dtype == projection.dtype
    for k, v in vit.state_dict().items():
        assert out[k] is sd[f'visual.{k}']
    model = timm.create_model('vit_base_patch16_224', pretrained=False, num_classes=32, img_size=32, patch_size=8,
                              embed_dim=64, depth=1, num_heads=2).eval()
    model.load_state_dict(out, strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit.eval()(x) @ projection, rtol=1e-5, atol=1e-5)
    half = from_slip({**sd, 'image_projection': projection.half()})
    assert half['head.bias'].dtype == torch.float16


def test_slip_file_round_trip(tmp_path):
    """A SLIP checkpoint as saved by its training (DDP prefixes, args Namespace) reads, is told as SLIP and converts."""
    vit, sd = slip_state()
    path = tmp_path / 'slip_base_25ep.pt'
    torch.save({'state_dict': {'module.' + k: v for k, v in sd.items()}, 'epoch': 25,
                'args': argparse.Namespace(model='SLIP_VITB16')}, path)
    read = read_teacher_weights(str(path))
    assert_same(read, sd)
    assert is_slip(read)
    assert torch.equal(from_slip(read)['head.weight'], sd['image_projection'].t())
