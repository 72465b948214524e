"""Pins SPEC sections 2-4: masking laws, both decoders, the losses, the patch layout."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import models_milan
from models_milan import (MilanViT, PromptingBlock, clip_feature_loss, create_model, masking_order, patchify,
                          pixel_loss)


def tiny(**kwargs):
    torch.manual_seed(0)
    return MilanViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32,
                    decoder_depth=2, decoder_num_heads=2, **kwargs)


@pytest.mark.parametrize('ratio,visible', [(0.75, 49), (0.5, 98), (0.9, 19), (0.6, 78)])
def test_masking_keeps_int_L_times_one_minus_r(ratio, visible):
    model = create_model('mae_vit_base_patch16', target='pixel')
    assert model.num_visible(ratio) == visible == int(196 * (1 - ratio))


def test_forward_masks_exactly_the_unkept_patches_and_encodes_only_visible():
    model = tiny(target='pixel')
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape))
    _, _, mask = model(torch.randn(3, 3, 32, 32), mask_ratio=0.75)
    assert mask.shape == (3, 16)
    assert mask.sum(1).tolist() == [12, 12, 12]
    assert seen == [torch.Size([3, 1 + 4, 64])]  # class token + 4 visible patches


def test_visible_patch_embedding_equals_the_convolution_then_gather():
    """The encoder embeds only the kept patches (a linear map on their pixels); it must agree with timm's conv
    patch embedding over all patches followed by the gather, in value and in the weight gradients."""
    model = tiny(target='pixel')
    imgs = torch.randn(3, 3, 32, 32)
    ids_keep = masking_order(3, 16, 'cpu')[:, :5]
    fast = model.embed_patches(imgs, ids_keep)
    (fast * torch.linspace(-1, 1, fast.numel()).view_as(fast)).sum().backward()
    fast_grads = [p.grad.clone() for p in model.patch_embed.parameters()]
    model.zero_grad()
    full = model.patch_embed(imgs) + model.pos_embed[:, 1:]
    ref = torch.gather(full, 1, ids_keep[..., None].expand(-1, -1, full.shape[-1]))
    (ref * torch.linspace(-1, 1, ref.numel()).view_as(ref)).sum().backward()
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(fast_grads, [p.grad for p in model.patch_embed.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='takes 32x32 images, got 48x48'):
        model.embed_patches(torch.randn(1, 3, 48, 48), ids_keep[:1])


def test_random_masking_is_uniform():
    torch.manual_seed(0)
    n, L, keep = 40000, 8, 2
    order = masking_order(n, L, 'cpu')
    visible = F.one_hot(order[:, :keep], L).sum(1).float().mean(0)
    assert torch.allclose(visible, torch.full((L,), keep / L), atol=0.01)
    first = torch.bincount(order[:, 0], minlength=L).float() / n
    assert torch.allclose(first, torch.full((L,), 1 / L), atol=0.01)


def exact_visible_probability(weights, keep):
    """P(patch i among the first `keep` draws without replacement, prob. proportional to weights)."""
    L = len(weights)
    probs = torch.zeros(L, dtype=torch.float64)
    for seq in itertools.permutations(range(L), keep):
        p, left = 1.0, float(sum(weights))
        for j in seq:
            p *= weights[j] / left
            left -= weights[j]
        for j in seq:
            probs[j] += p
    return probs


def test_semantic_masking_follows_importance():
    torch.manual_seed(0)
    n, keep = 40000, 2
    weights = [10.0, 1, 1, 1, 1, 1, 1, 2]
    importance = torch.tensor(weights).expand(n, -1)
    order = masking_order(n, len(weights), 'cpu', importance)
    visible = F.one_hot(order[:, :keep], len(weights)).sum(1).double().mean(0)
    exact = exact_visible_probability(weights, keep)
    assert torch.allclose(visible, exact, atol=0.01)
    # the heavy patch stays visible far more often than under uniform masking (0.25)
    assert visible[0] > 0.7 and exact[0] > 0.7
    # same law as torch.multinomial without replacement
    drawn = torch.multinomial(importance[:10000], keep, replacement=False)
    reference = F.one_hot(drawn, len(weights)).sum(1).double().mean(0)
    assert torch.allclose(visible, reference, atol=0.02)


def test_semantic_masking_is_per_image():
    torch.manual_seed(0)
    importance = torch.tensor([[100.0, 1, 1, 1], [1, 1, 1, 100.0]]).repeat(2000, 1)
    order = masking_order(4000, 4, 'cpu', importance)
    assert (order[0::2, 0] == 0).float().mean() > 0.9
    assert (order[1::2, 0] == 3).float().mean() > 0.9


def test_patchify_order_is_row_col_channel():
    p = 4
    img = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    patches = patchify(img, p)
    assert patches.shape == (2, 4, p * p * 3)
    # patch 1 is grid row 0, column 1; its element (r, c, ch) is img[ch, r, 4 + c]
    r, c, ch = 2, 3, 1
    assert patches[1, 1, (r * p + c) * 3 + ch] == img[1, ch, r, p + c]


def test_clip_loss_is_two_minus_two_cos_over_all_tokens():
    t = torch.randn(2, 5, 16)
    assert clip_feature_loss(3 * t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert clip_feature_loss(-t, t).item() == pytest.approx(4.0, abs=1e-6)
    e = torch.eye(16)[:2]
    assert clip_feature_loss(e[:1].expand(1, 1, 16), e[1:].expand(1, 1, 16)).item() == pytest.approx(2.0)
    pred = torch.randn(2, 5, 16)
    cos = F.cosine_similarity(pred, t, dim=-1)
    assert clip_feature_loss(pred, t).item() == pytest.approx((2 - 2 * cos).mean().item(), rel=1e-5)
    # every token counts: breaking only the class token raises the loss by (2 - 2cos)/tokens
    broken = t.clone()
    broken[:, 0] = -t[:, 0]
    assert clip_feature_loss(broken, t).item() == pytest.approx(4 / 5, rel=1e-5)


def test_pixel_loss_on_masked_patches_only():
    target = torch.zeros(1, 4, 3)
    pred = torch.tensor([[[1.0, 1, 1], [2, 2, 2], [3, 3, 3], [4, 4, 4]]])
    mask = torch.tensor([[0.0, 1, 0, 1]])
    assert pixel_loss(pred, target, mask, norm_pix_loss=False).item() == pytest.approx((4 + 16) / 2)


def test_norm_pix_loss_uses_unbiased_per_patch_variance():
    target = torch.tensor([[[1.0, 2.0, 4.0]]])
    mask = torch.ones(1, 1)
    mean, var = 7 / 3, ((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2
    normed = (target - mean) / (var + 1e-6) ** 0.5
    assert pixel_loss(normed, target, mask, norm_pix_loss=True).item() == pytest.approx(0.0, abs=1e-10)
    assert pixel_loss(target, target, mask, norm_pix_loss=True).item() > 0.1


def reference_prompting_block(block, fixed, m, order):
    """SPEC 3 literally: keys/values over [f ; LN1(m)] put back in image order; softmax attention."""
    h = block.norm1(m)
    full = torch.cat([fixed, h], dim=1)[:, order]
    heads = block.attn.num_heads
    b, nq, d = h.shape
    q = block.attn.q(h).reshape(b, nq, heads, d // heads).transpose(1, 2)
    k, v = block.attn.kv(full).reshape(b, full.shape[1], 2, heads, d // heads).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-1, -2) / (d // heads) ** 0.5).softmax(-1)
    m = m + block.attn.proj((attn @ v).transpose(1, 2).reshape(b, nq, d))
    return m + block.mlp(block.norm2(m))


def test_prompting_block_matches_spec_formula():
    torch.manual_seed(0)
    block = PromptingBlock(32, 4)
    for p in block.parameters():
        p.data.normal_(0, 0.2)
    fixed, m = torch.randn(2, 5, 32), torch.randn(2, 11, 32)
    order = torch.randperm(16)
    assert torch.allclose(block(fixed, m), reference_prompting_block(block, fixed, m, order), atol=1e-5)
    # the fixed tokens enter the keys WITHOUT LayerNorm1: normalising them changes the result
    assert not torch.allclose(block(block.norm1(fixed), m), block(fixed, m), atol=1e-4)


def decoder_inputs(model, b=2, mask_ratio=0.75):
    torch.manual_seed(1)
    keep = model.num_visible(mask_ratio)
    ids = masking_order(b, model.num_patches, 'cpu')
    latent = torch.randn(b, 1 + keep, model.decoder_embed.in_features)
    return latent, ids, keep


def test_prompting_decoder_never_changes_fixed_tokens():
    model = tiny(target='clip', target_dim=24, prompting_decoder=True).eval()
    latent, ids, keep = decoder_inputs(model)
    pred = model.forward_decoder(latent, ids)
    # expected fixed-token outputs: embedding + position, then only the final norm and prediction layer
    pos = model.decoder_pos_embed[0]
    emb = model.decoder_embed(latent)
    for i in range(latent.shape[0]):
        cls = model.decoder_pred(model.decoder_norm(emb[i, 0] + pos[0]))
        assert torch.allclose(pred[i, 0], cls, atol=1e-6)
        vis = ids[i, :keep]
        expected = model.decoder_pred(model.decoder_norm(emb[i, 1:] + pos[1 + vis]))
        assert torch.allclose(pred[i, 1 + vis], expected, atol=1e-6)
    # and no decoder block weight can move them
    with torch.no_grad():
        for blk in model.decoder_blocks:
            for p in blk.parameters():
                p.add_(torch.randn_like(p))
    pred2 = model.forward_decoder(latent, ids)
    vis = ids[:, :keep]
    assert torch.equal(pred2[:, 0], pred[:, 0])
    assert torch.equal(torch.gather(pred2[:, 1:], 1, vis[..., None].expand(-1, -1, 24)),
                       torch.gather(pred[:, 1:], 1, vis[..., None].expand(-1, -1, 24)))


def test_prompting_decoder_mask_outputs_depend_on_fixed_tokens():
    model = tiny(target='clip', target_dim=24, prompting_decoder=True).eval()
    latent, ids, keep = decoder_inputs(model)
    pred = model.forward_decoder(latent, ids)
    latent2 = latent.clone()
    latent2[:, 1] += 1.0  # one visible token's encoding
    pred2 = model.forward_decoder(latent2, ids)
    masked = ids[:, keep:]
    before = torch.gather(pred[:, 1:], 1, masked[..., None].expand(-1, -1, 24))
    after = torch.gather(pred2[:, 1:], 1, masked[..., None].expand(-1, -1, 24))
    assert (before - after).abs().amax(-1).min() > 1e-4  # every mask token responds


def test_mae_decoder_equals_image_order_reference():
    """Running the blocks in shuffled order and restoring at the end equals SPEC's image-order decoder."""
    model = tiny(target='clip', target_dim=24, prompting_decoder=False).eval()
    latent, ids, keep = decoder_inputs(model)
    b, L, d = latent.shape[0], model.num_patches, model.decoder_embed.out_features
    x = model.decoder_embed(latent)
    seq = model.mask_token.expand(b, L, d).clone()
    for i in range(b):
        seq[i, ids[i, :keep]] = x[i, 1:]
    x = torch.cat([x[:, :1], seq], dim=1) + model.decoder_pos_embed
    for blk in model.decoder_blocks:
        x = blk(x)
    reference = model.decoder_pred(model.decoder_norm(x))
    assert torch.allclose(model.forward_decoder(latent, ids), reference, atol=1e-5)
    # unlike the prompting decoder, the MAE decoder rewrites the visible tokens
    emb = model.decoder_embed(latent)[0, 1] + model.decoder_pos_embed[0, 1 + ids[0, 0]]
    assert not torch.allclose(reference[0, 1 + ids[0, 0]], model.decoder_pred(model.decoder_norm(emb)), atol=1e-3)


@pytest.mark.parametrize('use_clip,prompting', [(True, True), (True, False), (False, True), (False, False)])
def test_every_target_decoder_combination_trains(use_clip, prompting):
    model = tiny(target='clip' if use_clip else 'pixel', target_dim=24, prompting_decoder=prompting)
    imgs = torch.randn(2, 3, 32, 32)
    targets = torch.randn(2, 17, 24) if use_clip else None
    importance = torch.rand(2, 16) if use_clip else None
    loss, pred, mask = model(imgs, targets, importance)
    assert pred.shape == ((2, 17, 24) if use_clip else (2, 16, 8 * 8 * 3))
    if use_clip:
        assert loss.item() == pytest.approx(clip_feature_loss(pred, targets).item())
    else:
        assert loss.item() == pytest.approx(pixel_loss(pred, patchify(imgs, 8), mask, False).item())
    loss.backward()
    assert model.cls_token.grad is not None and model.decoder_pred.weight.grad is not None


def test_model_variants_have_published_shapes():
    shapes = {name: (cfg['patch_size'], cfg['embed_dim'], cfg['depth'], cfg['num_heads'])
              for name, cfg in models_milan.MODELS.items()}
    assert shapes['mae_vit_small_patch16'] == (16, 384, 12, 6)
    assert shapes['mae_vit_base_patch16'] == (16, 768, 12, 12)
    assert shapes['mae_vit_large_patch16'] == (16, 1024, 24, 16)
    assert shapes['mae_vit_huge_patch14'] == (14, 1280, 32, 16)
    model = create_model('mae_vit_base_patch16', target='clip', target_dim=512, prompting_decoder=True)
    assert len(model.decoder_blocks) == 8 and model.decoder_embed.out_features == 512
    assert model.decoder_blocks[0].attn.num_heads == 16 and model.decoder_pred.out_features == 512
    assert model.norm.eps == 1e-6 and model.blocks[0].attn.qkv.bias is not None
    assert set(model.state_dict()) >= {'patch_embed.proj.weight', 'cls_token', 'pos_embed', 'blocks.0.attn.qkv.weight',
                                       'norm.weight', 'decoder_embed.weight', 'mask_token', 'decoder_pred.weight'}


def test_cls_attention_is_the_last_blocks_class_row():
    """Against timm's own unfused attention probabilities, read where it applies attention dropout."""
    model = create_model('mae_vit_tiny_patch8', img_size=32).eval()
    x = torch.randn(3, 3, 32, 32)
    attn = model.blocks[-1].attn
    seen = []
    hook = attn.attn_drop.register_forward_hook(lambda m, inputs, output: seen.append(output))
    attn.fused_attn = False
    try:
        with torch.no_grad():
            model.forward_encoder(x, torch.arange(16).expand(3, -1), 16)
            ours = model.cls_attention(x)
    finally:
        hook.remove()
    assert ours.shape == (3, 16)
    torch.testing.assert_close(ours, seen[0].mean(1)[:, 0, 1:])


def test_method_flag_defaults_are_main_pretrains_and_build_the_model():
    """One table of the method's defaults: main_pretrain's parser, and what visualize.py and the checkpoint
    tools assume for a checkpoint that lacks a flag."""
    import main_pretrain
    parsed = vars(main_pretrain.get_args_parser().parse_args([]))
    assert {k: parsed[k] for k in models_milan.FLAG_DEFAULTS} == models_milan.FLAG_DEFAULTS
    model = models_milan.create_from_flags({'model': 'mae_vit_tiny_patch8', 'input_size': 32, 'use_clip': True,
                                            'change_decoder': True}, target_dim=64)
    assert model.prompting_decoder and model.target == 'clip' and model.decoder_pred.out_features == 64
    assert models_milan.create_from_flags({'model': 'mae_vit_tiny_patch8', 'input_size': 32}).target == 'pixel'


@pytest.mark.parametrize('norm', ['imagenet', 'clip'])
def test_batch_loss_is_the_teacher_on_its_view_then_the_student(norm):
    """models_milan.batch_loss, which training and visualize.panels share: the teacher sees teacher_view of the
    batch; its importance steers the masks only with attn_mask; the loss is the student's on those targets."""
    from models_clip import build_random_teacher
    from util.data import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, renormalize
    teacher = build_random_teacher(8, 4, output_dim=32)
    model = create_model('mae_vit_tiny_patch8', img_size=32, target='clip', target_dim=32, prompting_decoder=True)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    view = renormalize(x, IMAGENET_MEAN, IMAGENET_STD, CLIP_MEAN, CLIP_STD) if norm == 'clip' else x
    targets, importance = teacher(view)
    for attn_mask in (False, True):
        torch.manual_seed(5)
        got = models_milan.batch_loss(model, teacher, x, 0.75, attn_mask, norm)
        torch.manual_seed(5)
        loss, pred, mask = model(x, targets, importance if attn_mask else None, 0.75)
        torch.testing.assert_close(got.targets, targets, rtol=0, atol=0)
        torch.testing.assert_close(got.importance, importance, rtol=0, atol=0)
        assert torch.equal(got.mask, mask) and torch.equal(got.pred, pred) and torch.equal(got.loss, loss)
    assert not torch.equal(models_milan.teacher_view(x, 'clip'), x) and models_milan.teacher_view(x, 'imagenet') is x
    pixel = create_model('mae_vit_tiny_patch8', img_size=32, target='pixel')
    out = models_milan.batch_loss(pixel, None, x, 0.75, False)
    assert out.targets is None and out.importance is None and out.pred.shape == (3, 16, 8 * 8 * 3)
