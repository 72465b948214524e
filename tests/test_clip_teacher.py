"""The CLIP teacher against openai-clip's own model on tiny, locally generated checkpoints (no network).
The comparisons with openai-clip are skipped where it is not installed (GPU images); the rest runs anyway."""
import hashlib
import http.client
import io
import os
import re
import sys
import urllib.request
import warnings

import pytest
import torch

from util import clip_teacher
from util.errors import UserError
from util.clip_teacher import build_random_teacher, check_patch_grid, download_clip, load_clip_teacher

PATCH, GRID = 8, 4


@pytest.fixture(scope='module')
def clip():
    """openai-clip, the reference implementation: a test dependency only, the runtime never imports it."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # openai-clip imports the deprecated pkg_resources
        return pytest.importorskip('clip')


def test_url_table_matches_openai_clip(clip):
    vits = {name: url for name, url in clip.clip._MODELS.items() if name.startswith('ViT')}
    assert clip_teacher.CLIP_MODEL_URLS == vits
    assert set(clip_teacher.CLIP_RESNETS) == set(clip.clip._MODELS) - set(vits)
    assert all(re.fullmatch('[0-9a-f]{64}', url.split('/')[-2]) for url in vits.values())  # the SHA-256


@pytest.fixture(scope='module')
def clip_sd(clip):
    """A tiny full CLIP (2 vision heads, 3 blocks) with every parameter perturbed, so no LayerNorm or bias
    is trivial."""
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = clip.model.CLIP(embed_dim=32, image_resolution=PATCH * GRID, vision_layers=3, vision_width=128,
                                vision_patch_size=PATCH, context_length=8, vocab_size=100,
                                transformer_width=64, transformer_heads=1, transformer_layers=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval(), {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope='module')
def reference(clip, clip_sd):
    """openai-clip's model from its own build_model; fp32 weights restored after its fp16 conversion."""
    _, sd = clip_sd
    model = clip.model.build_model(dict(sd)).float().eval()
    model.load_state_dict(sd)
    return model


@pytest.fixture(scope='module')
def checkpoints(clip_sd, tmp_path_factory):
    """The same weights as a TorchScript archive, a plain state dict, a wrapped one and stripped visual keys."""
    model, sd = clip_sd
    d = tmp_path_factory.mktemp('ckpt')
    paths = {'plain': d / 'clip.pth', 'wrapped': d / 'clip_vit.pth.tar', 'stripped': d / 'visual.pth',
             'torchscript': d / 'ViT-T-8.pt'}
    torch.save(sd, paths['plain'])
    torch.save({'state_dict': sd, 'meta': {'epoch': 1}}, paths['wrapped'])
    torch.save({k[len('visual.'):]: v for k, v in sd.items() if k.startswith('visual.')}, paths['stripped'])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # tracer and jit deprecation warnings
        traced = torch.jit.trace(model, (torch.randn(1, 3, PATCH * GRID, PATCH * GRID), torch.zeros(1, 8).long()))
        torch.jit.save(traced, str(paths['torchscript']))
        assert all(k.startswith('visual.') for k in torch.jit.load(str(paths['torchscript'])).state_dict()
                   if 'conv1' in k)
    return paths


def images(n=3, seed=1):
    return torch.randn(n, 3, PATCH * GRID, PATCH * GRID, generator=torch.Generator().manual_seed(seed))


def reference_outputs(model, x):
    """Per-block outputs [N, 1+L, D] of openai-clip's visual tower and its last block's class-token attention."""
    visual = model.visual
    outs, last_in = [], []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o.permute(1, 0, 2)))
             for b in visual.transformer.resblocks]
    hooks.append(visual.transformer.resblocks[-1].register_forward_pre_hook(lambda m, i: last_in.append(i[0])))
    with torch.no_grad():
        cls = model.encode_image(x)
        block = visual.transformer.resblocks[-1]
        y = block.ln_1(last_in[0])
        _, attn = block.attn(y, y, y, need_weights=True, average_attn_weights=True)
    for h in hooks:
        h.remove()
    return cls, outs, attn[:, 0, 1:]


@pytest.mark.parametrize('kind', ['plain', 'wrapped', 'stripped', 'torchscript'])
def test_matches_openai_clip(kind, checkpoints, reference, tmp_path):
    teacher = load_clip_teacher(str(checkpoints[kind]), str(tmp_path))
    assert (teacher.patch_size, teacher.grid_size, teacher.input_size, teacher.output_dim) == (PATCH, GRID, 32, 32)
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    x = images()
    targets, importance = teacher(x)
    cls, outs, attn = reference_outputs(reference, x)
    visual = reference.visual
    with torch.no_grad():
        all_tokens = visual.ln_post(outs[-1]) @ visual.proj

    assert targets.shape == (3, 1 + GRID * GRID, 32) and importance.shape == (3, GRID * GRID)
    assert importance.dtype == torch.float32
    torch.testing.assert_close(targets[:, 0], cls, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(targets, all_tokens, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(importance, attn, rtol=1e-4, atol=1e-6)
    assert (importance >= 0).all()
    row = importance.sum(1)  # the class token's attention to itself is the missing mass
    assert ((row > 0) & (row < 1)).all()


def test_average_targets(checkpoints, reference, tmp_path):
    x = images()
    k1, imp1 = load_clip_teacher(str(checkpoints['plain']), str(tmp_path))(x)
    k2, imp2 = load_clip_teacher(str(checkpoints['plain']), str(tmp_path), average_targets=2)(x)
    _, outs, _ = reference_outputs(reference, x)
    ln, proj = reference.visual.ln_post, reference.visual.proj
    with torch.no_grad():
        manual = ln((ln(outs[-2]) + ln(outs[-1])) / 2) @ proj
    torch.testing.assert_close(k2, manual, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(k1, k2, atol=1e-3)
    torch.testing.assert_close(imp1, imp2)  # importance always comes from the last block
    with pytest.raises(UserError, match='average_targets'):
        load_clip_teacher(str(checkpoints['plain']), str(tmp_path), average_targets=4)


def test_fp16_checkpoint_loads_as_fp32(clip_sd, tmp_path):
    _, sd = clip_sd
    torch.save({k: v.half() for k, v in sd.items()}, tmp_path / 'half.pth')
    teacher = load_clip_teacher(str(tmp_path / 'half.pth'), str(tmp_path))
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    torch.testing.assert_close(teacher.proj, sd['visual.proj'].half().float())


@pytest.mark.parametrize('wrap', ['module', 'state_dict'])
def test_ddp_prefixed_and_wrapped_state_dicts_load(clip_sd, tmp_path, wrap):
    """A CLIP saved from a DDP-wrapped model (`module.visual.*`), bare or inside {'state_dict': ...}."""
    _, sd = clip_sd
    prefixed = {f'module.{k}': v for k, v in sd.items()}
    torch.save(prefixed if wrap == 'module' else {'epoch': 3, 'state_dict': prefixed}, tmp_path / 'ddp.pth')
    torch.save(sd, tmp_path / 'plain.pth')
    got = load_clip_teacher(str(tmp_path / 'ddp.pth'), str(tmp_path)).state_dict()
    want = load_clip_teacher(str(tmp_path / 'plain.pth'), str(tmp_path)).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_frozen_and_autocast():
    teacher = build_random_teacher(PATCH, GRID)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    x = images().requires_grad_()
    targets, importance = teacher(x)
    assert targets.grad_fn is None and not targets.requires_grad and importance.grad_fn is None
    with torch.autocast('cpu', dtype=torch.bfloat16):
        t16, i16 = teacher(x)
    assert i16.dtype == torch.float32
    torch.testing.assert_close(i16, importance, rtol=0.05, atol=0.01)
    torch.testing.assert_close(t16.float(), targets, rtol=0.05, atol=0.05)


def test_build_random_teacher_is_seeded_and_leaves_global_rng():
    state = torch.random.get_rng_state()
    a, b = build_random_teacher(PATCH, GRID, seed=3), build_random_teacher(PATCH, GRID, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.proj, build_random_teacher(PATCH, GRID, seed=4).proj)


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A fake URL table serving a tiny CLIP state dict over file:// (right and wrong hash); counts fetches.
    Built from our own teacher, so the download tests run without openai-clip."""
    buf = io.BytesIO()
    torch.save({f'visual.{k}': v for k, v in build_random_teacher(PATCH, GRID).state_dict().items()}, buf)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    good, bad = tmp_path / 'srv' / sha, tmp_path / 'srv' / ('0' * 64)
    for d in (good, bad):
        d.mkdir(parents=True)
        (d / 'ViT-T-8.pt').write_bytes(data)
    urls = {'ViT-T/8': (good / 'ViT-T-8.pt').as_uri(), 'ViT-Bad/8': (bad / 'ViT-T-8.pt').as_uri()}
    monkeypatch.setattr(clip_teacher, 'CLIP_MODEL_URLS', urls)
    calls = []
    real = urllib.request.urlopen
    monkeypatch.setattr(urllib.request, 'urlopen', lambda url, *a, **k: calls.append(url) or real(url, *a, **k))
    return calls


def test_download_once_and_reuse(served, tmp_path):
    cache = tmp_path / 'cache'
    teacher = load_clip_teacher('ViT-T/8', str(cache))
    assert os.listdir(cache) == ['ViT-T-8.pt'] and len(served) == 1
    assert teacher.grid_size == GRID
    load_clip_teacher('ViT-T/8', str(cache))
    assert len(served) == 1
    (cache / 'ViT-T-8.pt').write_bytes(b'corrupt')
    assert download_clip('ViT-T/8', str(cache)) == str(cache / 'ViT-T-8.pt')
    assert len(served) == 2 and (cache / 'ViT-T-8.pt').stat().st_size > 100


def test_downloaded_file_follows_the_umask(served, tmp_path):
    """A shared --clip_cache: the file must be readable by the other users the umask allows."""
    old = os.umask(0o022)
    try:
        download_clip('ViT-T/8', str(tmp_path / 'cache'))
    finally:
        os.umask(old)
    assert (tmp_path / 'cache' / 'ViT-T-8.pt').stat().st_mode & 0o777 == 0o644


def test_download_cut_off_mid_transfer(served, tmp_path, monkeypatch):
    """A chunked transfer that breaks off raises http.client.IncompleteRead: one line, nothing left behind."""
    class Broken(io.BytesIO):
        def read(self, *args):
            raise http.client.IncompleteRead(b'partial')

    monkeypatch.setattr(urllib.request, 'urlopen', lambda url, *a, **k: Broken())
    with pytest.raises(UserError, match='could not download CLIP ViT-T/8') as e:
        download_clip('ViT-T/8', str(tmp_path / 'cache'))
    assert '\n' not in str(e.value) and os.listdir(tmp_path / 'cache') == []


def test_download_hash_mismatch(served, tmp_path):
    cache = tmp_path / 'cache'
    with pytest.raises(UserError, match='SHA-256') as e:
        load_clip_teacher('ViT-Bad/8', str(cache))
    assert '\n' not in str(e.value)
    assert os.listdir(cache) == []


def test_resnet_name_refused(served, tmp_path):
    with pytest.raises(UserError, match='only ViT'):
        load_clip_teacher('RN50', str(tmp_path))
    assert served == []


def bad_files(tmp_path):
    (tmp_path / 'noise.pt').write_bytes(os.urandom(4096))
    (tmp_path / 'page.pt').write_bytes(b'<!DOCTYPE html><html><body>502 Bad Gateway</body></html>\n' * 20)
    torch.save({'state_dict': {'encoder.weight': torch.zeros(2)}}, tmp_path / 'other.pth')
    torch.save([torch.zeros(2)], tmp_path / 'list.pth')
    torch.save({'visual.layer1.0.conv1.weight': torch.zeros(1), 'visual.attnpool.positional_embedding': torch.zeros(1)},
               tmp_path / 'resnet.pth')
    return {'missing.pt': 'neither an existing file', 'noise.pt': 'cannot read', 'page.pt': 'not a PyTorch file',
            'other.pth': 'not a CLIP ViT', 'list.pth': 'not a state dict', 'resnet.pth': 'only ViT'}


@pytest.mark.parametrize('name, match', [('ViT-Z/99', 'neither an existing file'), ('RN50', 'only ViT')])
def test_bad_model_names(name, match, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'clip', None)  # GPU images have no openai-clip: any import of it fails
    with pytest.raises(UserError, match=match) as e:
        load_clip_teacher(name, str(tmp_path))
    assert '\n' not in str(e.value)


def test_bad_files(tmp_path):
    for name, match in bad_files(tmp_path).items():
        path = str(tmp_path / name)
        with pytest.raises(UserError, match=match) as e:
            load_clip_teacher(path, str(tmp_path / 'cache'))
        assert '\n' not in str(e.value) and path in str(e.value), str(e.value)
        assert 'weights_only' not in str(e.value)  # torch's advice to load unsafely is never passed on


def test_patch_grid_and_input_size_checks():
    teacher = build_random_teacher(16, 14)
    check_patch_grid(teacher, 16, 14)
    with pytest.raises(UserError) as e:
        check_patch_grid(teacher, 14, 16)
    assert str(e.value) == ('teacher CLIP ViT uses 16px patches on a 14x14 grid but the student uses 14px patches '
                            'on a 16x16 grid; pick a student --model/--input_size with the same grid')
    with pytest.raises(UserError, match='224x224') as e:
        teacher(torch.zeros(1, 3, 192, 192))
    assert '\n' not in str(e.value)
