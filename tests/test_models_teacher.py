"""models_teacher: timm ViT teachers (CLIP, DINO, DINOv2, DINOv3, SigLIP, EVA02, SLIP) against timm's own forward."""
import argparse
import functools

import pytest
import timm
import torch
import torch.nn.functional as F

import models_clip
import models_teacher
from conftest import CLIP_GRID, CLIP_PATCH
from models_milan import teacher_view
from models_teacher import TimmTeacher, build_teacher, build_timm_teacher
from util.data import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from util.errors import UserError

TINY = dict(embed_dim=64, depth=2, num_heads=2)
FAMILIES = {  # name -> (timm model, input size): 4x4 patch grids
    'clip': ('vit_base_patch16_clip_224.laion2b', 64),
    'dino': ('vit_base_patch16_224.dino', 64),
    'dinov2': ('vit_base_patch14_dinov2.lvd142m', 56),
    'dinov2_reg4': ('vit_base_patch14_reg4_dinov2.lvd142m', 56),
    'dinov3': ('vit_base_patch16_dinov3.lvd1689m', 64),
    'siglip': ('vit_base_patch16_siglip_224.webli', 64),
    'eva02_clip': ('eva02_base_patch16_clip_224.merged2b', 64),
}
PREFIX = {'clip': 1, 'dino': 1, 'dinov2': 1, 'dinov2_reg4': 5, 'dinov3': 5, 'siglip': 0, 'eva02_clip': 1}
CLIP_FAMILIES = ('clip', 'eva02_clip')
L = 16


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """Noise on every parameter, so that attention is far from uniform, LayerScale (1e-5 at init) lets the blocks
    count and no LayerNorm or bias is trivial: a wrong implementation cannot hide in near-zero terms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def make(family: str, average_targets: int = 1, seed: int = 0) -> TimmTeacher:
    """A tiny random, perturbed teacher of `family`; the same seed gives the same weights."""
    arch, size = FAMILIES[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        teacher = build_timm_teacher(arch, '', size, average_targets, pretrained=False, **TINY)
    perturb(teacher.model, seed)
    return teacher


def images(size: int, n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope='module')
def teachers():
    """One teacher per family, built once for the module (the tests only read them)."""
    return {family: make(family) for family in FAMILIES}


def hooked_class_row(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's own softmax probabilities of the last block (non-fused path, caught at attn_drop): the class query's
    row over the patch keys, heads averaged [B, L]."""
    attn, captured = model.blocks[-1].attn, []
    fused, attn.fused_attn = attn.fused_attn, False
    hook = attn.attn_drop.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    try:
        with torch.no_grad():
            model.forward_features(x)
    finally:
        hook.remove()
        attn.fused_attn = fused
    (probs,) = captured
    assert probs.shape == (x.shape[0], attn.num_heads, L + model.num_prefix_tokens, L + model.num_prefix_tokens)
    return probs[:, :, 0, model.num_prefix_tokens:].mean(1)


def pool_probe_attention(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """SigLIP's attention-pool probabilities [B, heads, 1, L] recomputed from the pool's modules; checked by
    rebuilding the pool's output from them against timm's forward_head."""
    ap, (b, n, _) = model.attn_pool, tokens.shape
    x = tokens if ap.pos_embed is None else tokens + ap.pos_embed.unsqueeze(0)
    q = ap.q(ap.latent.expand(b, -1, -1)).reshape(b, ap.latent_len, ap.num_heads, ap.head_dim).transpose(1, 2)
    k, v = ap.kv(x).reshape(b, n, 2, ap.num_heads, ap.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = ap.q_norm(q), ap.k_norm(k)
    probs = ((q * ap.scale) @ k.transpose(-2, -1)).softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(b, ap.latent_len, -1)
    out = ap.proj_drop(ap.proj(out))
    out = out + ap.mlp(ap.norm(out))
    torch.testing.assert_close(out[:, 0], model.forward_head(tokens, pre_logits=True), rtol=1e-5, atol=1e-5)
    return probs


def reference(teacher: TimmTeacher, x: torch.Tensor, tokens: torch.Tensor = None):
    """The targets [B, 1+L, D] each family defines, from timm's forward: the normed class token and patch tokens
    (register tokens dropped), projected by the head for CLIP; SigLIP's pooled embedding in the class slot."""
    m = teacher.model
    with torch.no_grad():
        ff = m.forward_features(x) if tokens is None else tokens
        patches = ff[:, m.num_prefix_tokens:]
        first = ff[:, :1] if m.cls_token is not None else m.forward_head(ff, pre_logits=True)[:, None]
        out = torch.cat([first, patches], 1)
        return m.head(out) if teacher.projection else out


@pytest.mark.parametrize('family', FAMILIES)
def test_targets_match_timm_forward(family, teachers):
    """Targets are timm's forward_features tokens (class token, patches after the prefix; through the head for
    CLIP-trained models, whose class slot then is timm's image embedding); SigLIP's class slot is its pool."""
    teacher, (_, size) = teachers[family], FAMILIES[family]
    m, x = teacher.model, images(size)
    assert teacher.prefix == m.num_prefix_tokens == PREFIX[family]
    assert (teacher.input_size, teacher.grid_size) == (size, 4)
    assert teacher.projection == (family in CLIP_FAMILIES)
    assert teacher.output_dim == (m.head.out_features if family in CLIP_FAMILIES else 64)
    targets, _ = teacher(x)
    assert targets.shape == (2, 1 + L, teacher.output_dim) and targets.dtype == torch.float32
    with torch.no_grad():
        ff = m.forward_features(x)
        if family in CLIP_FAMILIES:
            torch.testing.assert_close(targets[:, 0], m.forward_head(ff), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(targets[:, 0], m.head(ff[:, 0]), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(targets[:, 1:], m.head(ff[:, teacher.prefix:]), rtol=1e-5, atol=1e-5)
        elif family == 'siglip':
            torch.testing.assert_close(targets[:, 0], m.forward_head(ff, pre_logits=True), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(targets[:, 1:], ff, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(targets[:, 0], ff[:, 0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(targets[:, 1:], ff[:, teacher.prefix:], rtol=1e-5, atol=1e-5)
    if teacher.prefix > 1:  # the register/storage tokens are not among the targets
        assert not torch.allclose(targets[:, 1:5], ff[:, 1:5], atol=1e-3)


@pytest.mark.parametrize('family', FAMILIES)
def test_importance_matches_attention(family, teachers):
    """Importance is the last block's head-averaged class-token attention over the patch keys, as timm computes it
    (after rope for DINOv3/EVA02); SigLIP's is its attention pool's probe attention, a distribution."""
    teacher, (_, size) = teachers[family], FAMILIES[family]
    m, x = teacher.model, images(size)
    _, importance = teacher(x)
    assert importance.shape == (2, L) and importance.dtype == torch.float32 and (importance >= 0).all()
    if family == 'siglip':
        assert teacher.importance_source == 'attention pool'
        with torch.no_grad():
            expected = pool_probe_attention(m, m.forward_features(x))[:, :, 0].mean(1)
        torch.testing.assert_close(importance.sum(1), torch.ones(2), rtol=0, atol=1e-5)
    else:
        assert teacher.importance_source == 'class token'
        expected = hooked_class_row(m, x)
        assert (importance.sum(1) < 1).all()  # the prefix keys hold the rest of the mass
    torch.testing.assert_close(importance, expected, rtol=1e-5, atol=1e-5)
    assert (importance.max(1).values > 2 * importance.min(1).values).all()  # not flat: the comparison means something


def test_rope_is_in_the_importance(teachers):
    """DINOv3's importance depends on the rotary embedding: the same row computed without it is clearly off."""
    teacher = teachers['dinov3']
    m, x = teacher.model, images(64)
    _, importance = teacher(x)
    with torch.no_grad():
        t, rope = m._pos_embed(m.patch_embed(x))
        t = m.blocks[0](m.norm_pre(t), rope=rope)
        with_rope = models_teacher.eva_cls_attention(m.blocks[-1], t, rope)[:, teacher.prefix:]
        no_rope = models_teacher.eva_cls_attention(m.blocks[-1], t, None)[:, teacher.prefix:]
    torch.testing.assert_close(with_rope, importance, rtol=1e-5, atol=1e-6)
    assert (importance - no_rope).abs().max() > 1e-3


@pytest.mark.parametrize('family', FAMILIES)
def test_average_targets(family, teachers):
    """average_targets=2: the targets are norm(mean(norm(out_k))) of the last two blocks' outputs (timm's
    forward_intermediates), projected/pooled as usual; the importance still comes from the last block alone."""
    one, (_, size) = teachers[family], FAMILIES[family]
    two = make(family, average_targets=2)
    assert all(torch.equal(p, q) for p, q in zip(one.model.state_dict().values(), two.model.state_dict().values()))
    m, x = two.model, images(size)
    targets, importance = two(x)
    t1, i1 = one(x)
    with torch.no_grad():
        outs = m.forward_intermediates(x, indices=2, norm=False, output_fmt='NLC', return_prefix_tokens=True,
                                       intermediates_only=True)
        outs = [o if torch.is_tensor(o) else torch.cat([o[1], o[0]], 1) for o in outs]  # (patches, prefix) pairs
        norm = m.norm if not isinstance(m.norm, torch.nn.Identity) else m.fc_norm
        averaged = norm(torch.stack([norm(o) for o in outs]).mean(0))
        torch.testing.assert_close(norm(outs[-1]), m.forward_features(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(targets, reference(two, x, averaged), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(targets, t1, atol=1e-2)
    torch.testing.assert_close(importance, i1, rtol=0, atol=0)
    with pytest.raises(UserError, match='--average_targets 3 is out of range') as e:
        TimmTeacher(m, two.projection, 3)
    assert '\n' not in str(e.value)


@pytest.fixture(scope='module')
def openai_file(clip_sd, tmp_path_factory):
    """The tiny OpenAI CLIP (conftest) as a state dict file in OpenAI's `visual.*` layout."""
    path = tmp_path_factory.mktemp('openai') / 'clip_tiny.pth'
    torch.save(clip_sd[1], path)
    return str(path)


def test_openai_clip_through_timm(openai_file, clip_sd, tmp_path):
    """An `.openai` CLIP name with an OpenAI file gives our OpenAI teacher's targets and importance and
    openai-clip's encode_image (it is built with QuickGELU); the GELU-built laion2b name with the same file
    gives clearly other numbers."""
    size, shape = CLIP_PATCH * CLIP_GRID, dict(embed_dim=128, depth=3, num_heads=2, patch_size=CLIP_PATCH)
    # num_classes: the tiny file's 32-d projection (timm's cfg says 512, the real OpenAI B/16's)
    timm_openai = build_timm_teacher('vit_base_patch16_clip_224.openai', openai_file, size, 1, num_classes=32, **shape)
    timm_gelu = build_timm_teacher('vit_base_patch16_clip_224.laion2b', openai_file, size, 1, num_classes=32, **shape)
    ours = models_clip.load_clip_teacher(openai_file, str(tmp_path))
    assert isinstance(timm_openai.model.blocks[0].mlp.act, timm.layers.QuickGELU)
    assert not isinstance(timm_gelu.model.blocks[0].mlp.act, timm.layers.QuickGELU)
    assert (timm_openai.output_dim, timm_openai.mean, timm_openai.std) == (32, CLIP_MEAN, CLIP_STD)
    x = images(size, n=3)
    targets, importance = timm_openai(x)
    expected_targets, expected_importance = ours(x)
    torch.testing.assert_close(targets, expected_targets, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(importance, expected_importance, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(targets[:, 0], clip_sd[0].encode_image(x), rtol=1e-4, atol=1e-4)
    quickgelu = build_timm_teacher('vit_base_patch16_clip_quickgelu_224.openai', openai_file, size, 1,
                                   num_classes=32, **shape)  # timm's own QuickGELU name: the same numbers
    torch.testing.assert_close(quickgelu(x)[0], expected_targets, rtol=1e-4, atol=1e-4)
    gelu_targets, gelu_importance = timm_gelu(x)
    assert (gelu_targets - expected_targets).abs().max() > 1e-2
    assert (gelu_importance - expected_importance).abs().max() > 1e-3


def test_openai_file_needs_the_projection_width(openai_file):
    """Without num_classes the head keeps timm's 512-d cfg, and the 32-d file is refused as not fitting."""
    shape = dict(embed_dim=128, depth=3, num_heads=2, patch_size=CLIP_PATCH)
    with pytest.raises(UserError, match='does not fit timm:vit_base_patch16_clip_224.openai') as e:
        build_timm_teacher('vit_base_patch16_clip_224.openai', openai_file, CLIP_PATCH * CLIP_GRID, 1, **shape)
    assert '\n' not in str(e.value) and 'head' in str(e.value)


def slip_checkpoint(path, seed=0):
    """A SLIP-format checkpoint of a tiny timm ViT (/8 at 32 px, 64 wide) with a [64, 32] image projection, as SLIP's
    training saves it: DDP prefixes, the text tower and SimCLR head alongside, its args pickled."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        visual = timm.create_model('vit_base_patch16_224', pretrained=False, num_classes=0, img_size=32,
                                   patch_size=8, **TINY).eval()
    perturb(visual, seed)
    g = torch.Generator().manual_seed(seed + 1)
    projection = torch.randn(64, 32, generator=g)
    state = {f'module.visual.{k}': v for k, v in visual.state_dict().items()}
    state.update({'module.image_projection': projection, 'module.text_projection': torch.randn(64, 32, generator=g),
                  'module.logit_scale': torch.tensor(2.6), 'module.token_embedding.weight': torch.randn(100, 64),
                  'module.image_mlp.layer1.weight': torch.randn(128, 64)})
    torch.save({'state_dict': state, 'epoch': 1, 'args': argparse.Namespace(model='SLIP_VITB16', lr=3e-3)}, path)
    return visual, projection


def test_slip_checkpoint(tmp_path):
    """A SLIP file loads into its timm ViT with the image projection as head: every token's target is the normed
    token @ image_projection (the class one is SLIP's visual(x) @ image_projection), with ImageNet statistics."""
    path = str(tmp_path / 'slip_tiny.pt')
    visual, projection = slip_checkpoint(path)
    teacher = build_timm_teacher('vit_base_patch16_224', path, 32, 1, patch_size=8, **TINY)
    assert teacher.projection and teacher.output_dim == 32
    assert (teacher.mean, teacher.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert timm.get_pretrained_cfg('vit_base_patch16_224').mean != IMAGENET_MEAN  # the cfg would be wrong here
    x = images(32, n=3)
    targets, importance = teacher(x)
    with torch.no_grad():
        torch.testing.assert_close(targets, visual.forward_features(x) @ projection, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(targets[:, 0], visual(x) @ projection, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(importance, hooked_class_row(visual, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(teacher.model.head.bias, torch.zeros(32), rtol=0, atol=0)


def flags(tmp_path, clip_model, weights='', size=None, attn_mask=False):
    return argparse.Namespace(use_clip=True, clip_model=clip_model, teacher_weights=weights,
                              teacher_input_size=size, average_targets=1, attn_mask=attn_mask,
                              clip_cache=str(tmp_path))


@pytest.fixture
def tiny_build(monkeypatch):
    """build_teacher (which takes no architecture overrides) builds tiny random models."""
    monkeypatch.setattr(models_teacher, 'build_timm_teacher',
                        functools.partial(build_timm_teacher, pretrained=False, **TINY))


def one_line_error(fn, *args, match, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as e:
        fn(*args, **kwargs)
    assert '\n' not in str(e.value)
    return str(e.value)


def test_unknown_timm_name(tmp_path):
    """An unknown timm name is refused before anything is built or downloaded, naming how to list models."""
    msg = one_line_error(build_teacher, flags(tmp_path, 'timm:vit_nope_patch16_224'), 16, 4,
                         match='timm:vit_nope_patch16_224 is not a timm model name')
    assert 'timm.list_models' in msg


def test_non_vit_model_is_refused():
    """A timm model that is no ViT (resnet18) is refused saying so."""
    one_line_error(build_timm_teacher, 'resnet18', '', 64, pretrained=False, match='not a ViT')


def test_vit_like_model_of_another_class_is_refused():
    """A transformer of another timm class (BEiT) is refused as not a ViT this code reads."""
    msg = one_line_error(build_timm_teacher, 'beit_base_patch16_224', '', 64, pretrained=False,
                         match=r'(?i)timm:beit_base_patch16_224 is a beit\b.*not a ViT', **TINY)
    assert 'timm:vit_base_patch16_clip_224.laion2b' in msg


def test_weights_of_another_model_are_refused(tmp_path, teachers):
    """A weight file for another model (DINO weights for a CLIP name; for a wider DINO) does not fit."""
    path = str(tmp_path / 'dino_tiny.pth')
    torch.save(teachers['dino'].model.state_dict(), path)
    one_line_error(build_timm_teacher, 'vit_base_patch16_clip_224.laion2b', path, 64, 1,
                   match='dino_tiny.pth does not fit timm:vit_base_patch16_clip_224.laion2b', **TINY)
    msg = one_line_error(build_timm_teacher, 'vit_base_patch16_224.dino', path, 64, 1, embed_dim=128, depth=2,
                         num_heads=2, match='dino_tiny.pth does not fit timm:vit_base_patch16_224.dino')
    assert 'size mismatch' in msg
    loaded = build_timm_teacher('vit_base_patch16_224.dino', path, 64, 1, **TINY)  # its own model takes it
    targets, _ = loaded(images(64))
    torch.testing.assert_close(targets, teachers['dino'](images(64))[0], rtol=0, atol=0)


def test_attn_mask_needs_class_token_or_pool(tmp_path, tiny_build):
    """--attn_mask with a teacher that has neither a class token nor an attention pool (SigLIP-GAP) is refused;
    without --attn_mask the same teacher builds (importance None)."""
    arch = 'vit_base_patch16_siglip_gap_224'
    path = str(tmp_path / 'siglip_gap.pth')
    torch.save(timm.create_model(arch, pretrained=False, img_size=64, num_classes=0, **TINY).state_dict(), path)
    msg = one_line_error(build_teacher, flags(tmp_path, f'timm:{arch}', path, attn_mask=True), 16, 4,
                         match='--attn_mask needs the teacher\'s attention')
    assert f'timm:{arch}' in msg
    teacher = build_teacher(flags(tmp_path, f'timm:{arch}', path), 16, 4)
    assert teacher.importance_source is None
    targets, importance = teacher(images(64))
    assert importance is None and targets.shape == (2, 1 + L, 64)


def test_grid_mismatch_names_the_teacher_input_size(tmp_path, tiny_build):
    """A /14 teacher for a /16 student at 224 px (14x14 grid) is refused naming --teacher_input_size 196, and
    builds with it."""
    spec = 'timm:vit_base_patch14_dinov2.lvd142m'
    one_line_error(build_teacher, flags(tmp_path, spec), 16, 14, match=r'16x16 grid .* 14x14 grid; pass '
                   r'--teacher_input_size 196$')
    teacher = build_teacher(flags(tmp_path, spec, size=196), 16, 14)
    assert (teacher.input_size, teacher.grid_size, teacher.patch_size) == (196, 14, 14)
    targets, importance = teacher(torch.randn(1, 3, 196, 196))
    assert targets.shape == (1, 1 + 14 * 14, 64) and importance.shape == (1, 14 * 14)


@pytest.mark.parametrize('patch, grid, size, fits', [(16, 4, None, 56), (16, 14, 200, 196)])
def test_size_that_is_no_patch_multiple(patch, grid, size, fits, tmp_path, tiny_build):
    """A /14 teacher at a size that is no multiple of 14 (the 64 px of a 4x4 /16 student; --teacher_input_size 200
    for a 14x14 one) has the student's grid, but a fixed-size timm ViT built at that size cannot take the
    `fits`-px images its input_size names: either refused naming --teacher_input_size `fits`, or built so that
    its forward works on the teacher's view of the batch (never a bare AssertionError from timm)."""
    spec = 'timm:vit_base_patch14_dinov2.lvd142m'
    try:
        teacher = build_teacher(flags(tmp_path, spec, size=size), patch, grid)
    except UserError as e:
        assert f'--teacher_input_size {fits}' in str(e) and '\n' not in str(e)
        return
    assert teacher.input_size == fits
    targets, _ = teacher(teacher_view(images(patch * grid), 'teacher', teacher))
    assert targets.shape == (2, 1 + grid * grid, 64)


def test_teacher_view():
    """teacher_view resizes to the teacher's input size (bicubic, antialiased) and, with 'teacher', maps the
    ImageNet-normalised batch to the teacher's own statistics: as if the raw image were normalised with them."""
    teacher = build_timm_teacher('vit_base_patch16_siglip_224.webli', '', 48, pretrained=False, **TINY)
    assert teacher.input_size == 48 and teacher.mean == teacher.std == (0.5, 0.5, 0.5)  # unlike ImageNet's
    raw = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # the student's 64 px batch
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    t_mean, t_std = (torch.tensor(v).view(1, 3, 1, 1) for v in (teacher.mean, teacher.std))
    c_mean, c_std = (torch.tensor(v).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    normed = (raw - mean) / std
    resized = F.interpolate(raw, size=(48, 48), mode='bicubic', align_corners=False, antialias=True)
    view = teacher_view(normed, 'teacher', teacher)
    torch.testing.assert_close(view, (resized - t_mean) / t_std, rtol=1e-5, atol=1e-5)
    imagenet = teacher_view(normed, 'imagenet', teacher)
    torch.testing.assert_close(imagenet, (resized - mean) / std, rtol=1e-5, atol=1e-5)
    aliased = F.interpolate(raw, size=(48, 48), mode='bicubic', align_corners=False)
    assert (imagenet - (aliased - mean) / std).abs().max() > 1e-2  # the antialiasing is visible
    torch.testing.assert_close(teacher_view(normed, 'clip', teacher), (resized - c_mean) / c_std, rtol=1e-5, atol=1e-5)
    targets, importance = teacher(view)
    assert targets.shape == (2, 1 + 9, 64) and importance.shape == (2, 9)
    same = teacher_view(normed, 'teacher', build_timm_teacher('vit_base_patch16_siglip_224.webli', '', 64,
                                                              pretrained=False, **TINY))
    torch.testing.assert_close(same, (raw - t_mean) / t_std, rtol=1e-5, atol=1e-5)  # no resize at its size


def test_wrong_input_size_is_a_user_error(teachers):
    """Images of another size than the teacher's get a one-line UserError naming --teacher_input_size."""
    one_line_error(teachers['dinov2'], images(64),
                   match='takes 56x56 images but got 64x64; set --teacher_input_size 56')


@pytest.mark.parametrize('family', FAMILIES)
def test_frozen_eval_and_autocast(family, teachers):
    """The teacher is frozen (no parameter requires grad, no graph) and stays in eval mode whatever train() says;
    under bf16 autocast the importance stays float32 and close to fp32's."""
    teacher, (_, size) = teachers[family], FAMILIES[family]
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teacher.train() is teacher
    assert not teacher.training and not any(m.training for m in teacher.modules())
    x = images(size).requires_grad_()
    targets, importance = teacher(x)
    assert not targets.requires_grad and targets.grad_fn is None and importance.grad_fn is None
    with torch.autocast('cpu', dtype=torch.bfloat16):
        t16, i16 = teacher(x)
    assert i16.dtype == torch.float32
    torch.testing.assert_close(i16, importance, rtol=0.1, atol=0.02)
    cos = F.cosine_similarity(t16.float(), targets, dim=-1)
    assert cos.min() > 0.98


@pytest.mark.slow  # Inductor on the CPU: ~5 s with a warm compile cache, 20-25 s cold on 2 cores
def test_per_block_compile_matches_eager():
    """Compiling each block (as --compile does) leaves DINOv3's targets and importance (Eva, rope) unchanged."""
    teacher, x = make('dinov3'), images(64)
    eager = teacher(x)
    for block in teacher.blocks:
        block.compile(dynamic=False)
    compiled = teacher(x)
    assert all(getattr(b, '_compiled_call_impl', None) is not None for b in teacher.blocks)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-5, atol=1e-5)
