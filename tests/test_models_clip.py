"""models_clip: the CLIP teacher against openai-clip's own model on tiny, locally generated checkpoints (no network).
The comparisons with openai-clip are skipped where it is not installed (GPU images); the rest runs anyway."""
import warnings

import pytest
import torch

from conftest import CLIP_GRID, CLIP_PATCH
from models_clip import build_random_teacher, load_clip_teacher
from models_teacher import check_grid
from util.errors import UserError

PATCH, GRID = CLIP_PATCH, CLIP_GRID


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


def test_patch_grid_and_input_size_checks():
    teacher = build_random_teacher(16, 14)
    check_grid(teacher, 16, 14)
    with pytest.raises(UserError) as e:
        check_grid(teacher, 14, 16)
    assert str(e.value) == ('the teacher uses 16px patches on a 14x14 grid but the student uses 14px patches '
                            'on a 16x16 grid; pick a student --model/--input_size with the same grid')
    with pytest.raises(UserError, match='224x224') as e:
        teacher(torch.zeros(1, 3, 192, 192))
    assert '\n' not in str(e.value)
