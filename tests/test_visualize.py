"""visualize.py on a real pretraining checkpoint: the PNG layout (two rows of three labelled cells, a title with the
epoch), the exact mask panel, the attention maps and colour scale, released MMPretrain files, image sources, and
one-line errors."""
import copy
import os
import runpy
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

import models_milan
import visualize
from conftest import ROOT
from test_pretrained import write_mmpretrain_milan
from util.data import to_device_normalized
from util.errors import UserError

S, P, G = 32, 8, 4  # input size, patch size, grid of the tiny test model
Z = 5  # the smallest zoom that makes a 32 px panel READABLE (160 px)
SIDE = S * Z
# The pinned layout: cells of SIDE px in two rows of three, 4 px apart and around, a 14 px label band above each
# panel; with a title, a 14 px band and 4 px more on top.
WIDTH, HEIGHT, TITLED = 496, 360, 378
assert (WIDTH, HEIGHT, TITLED) == (4 + 3 * (SIDE + 4), 4 + 2 * (14 + SIDE + 4), 4 + 18 + 2 * (14 + SIDE + 4))


def origin(i, titled=False, side=SIDE):
    """Top-left pixel of cell i (0 image, 1 mask, 2 teacher attn, 3 loss, 4 student attn, 5 colour scale)."""
    row, column = divmod(i, 3)
    return 4 + column * (side + 4), 4 + (18 if titled else 0) + row * (14 + side + 4) + 14


def panel(grid, i, titled=False):
    """Panel i of one rendered grid at the input's resolution: every zoomed pixel must be a uniform Z x Z block."""
    x, y = origin(i, titled)
    big = grid[y:y + SIDE, x:x + SIDE]
    small = big[::Z, ::Z]
    assert np.array_equal(big, small.repeat(Z, axis=0).repeat(Z, axis=1))
    return small


def patch(array, index):
    r, c = divmod(index, G)
    return array[r * P:(r + 1) * P, c * P:(c + 1) * P]


@pytest.fixture(scope='module')
def checkpoint(milan_checkpoint):
    return milan_checkpoint


@pytest.fixture(scope='module')
def loaded(checkpoint, tiny_data):
    model, teacher, args = visualize.load_pretrain_checkpoint(checkpoint)
    paths = visualize.image_paths([os.path.join(tiny_data, 'val')], 4)
    return model, teacher, args, visualize.load_images(paths, S)


def run(argv):
    visualize.main(visualize.get_args_parser().parse_args(argv))


def test_one_png_per_image_with_the_pinned_size(checkpoint, tiny_data, tmp_path, capsys):
    run(['--checkpoint', checkpoint, '--images', os.path.join(tiny_data, 'val'), '--num_images', '3',
         '--out_dir', str(tmp_path / 'vis')])
    files = sorted(os.listdir(tmp_path / 'vis'))
    # every 16 // 3 = 5th of the 16 sorted images: several classes, not the first three discs
    assert files == ['disc_0000.png', 'hstripes_0001.png', 'square_0002.png']
    for name in files:
        image = Image.open(tmp_path / 'vis' / name)
        assert image.mode == 'RGB' and image.size == (WIDTH, TITLED)
    out = capsys.readouterr().out
    assert 'carry no meaning' in out and '(checkpoint-last.pth: epoch 0 done)' in out


def test_files_zoom_and_the_demo_default(checkpoint, tiny_data, tmp_path):
    one = os.path.join(tiny_data, 'val', 'square', 'square_0001.JPEG')
    run(['--checkpoint', checkpoint, '--images', one, '--out_dir', str(tmp_path / 'files'), '--zoom', '6'])
    assert Image.open(tmp_path / 'files' / 'square_0001.png').size == (4 + 3 * (6 * S + 4), 22 + 2 * (18 + 6 * S))
    # a zoom too small for the labels is raised to the readable one
    run(['--checkpoint', checkpoint, '--images', one, '--out_dir', str(tmp_path / 'small'), '--zoom', '2'])
    assert Image.open(tmp_path / 'small' / 'square_0001.png').size == (WIDTH, TITLED)
    run(['--checkpoint', checkpoint, '--num_images', '2', '--out_dir', str(tmp_path / 'demo')])
    assert sorted(os.listdir(tmp_path / 'demo')) == ['disc_0000.png', 'square_0000.png']


def test_mask_panel_greys_exactly_the_masked_patches(loaded):
    model, teacher, _, images = loaded
    out = visualize.panels(model, teacher, images, mask_ratio=0.75, seed=3, attn_mask=True)
    assert out.grids.shape == (4, HEIGHT, WIDTH, 3) and out.grids.dtype == np.uint8
    assert visualize.grid_shape(S) == (HEIGHT, WIDTH, 3) and visualize.grid_shape(S, 1, titled=True)[0] == TITLED
    assert out.mask.shape == (4, G * G) and (out.mask.sum(1) == G * G - model.num_visible(0.75)).all()
    zero = visualize.COLORMAP[0]
    for n, grid in enumerate(out.grids):
        image, masked, loss = panel(grid, 0), panel(grid, 1), panel(grid, 3)
        assert np.array_equal(image, images[n].permute(1, 2, 0).numpy())
        for i in range(G * G):
            if out.mask[n, i]:
                assert (patch(masked, i) == visualize.GREY).all()
            else:
                assert np.array_equal(patch(masked, i), patch(image, i))
                assert (patch(loss, i) == zero).all()  # visible patches carry no loss

    # the mask is masking_order's draw from the teacher's importance under the seed
    _, importance = teacher(to_device_normalized(images, torch.device('cpu')))
    torch.manual_seed(3)
    order = models_milan.masking_order(4, G * G, 'cpu', importance)
    expected = torch.ones(4, G * G).scatter_(1, order[:, :model.num_visible(0.75)], 0.0)
    assert torch.equal(out.mask, expected)
    assert not torch.equal(visualize.panels(model, teacher, images, 0.75, seed=4, attn_mask=True).mask, out.mask)
    # a run trained with random masking (--no-attn_mask) is shown random masks, as it trained
    torch.manual_seed(3)
    order = models_milan.masking_order(4, G * G, 'cpu')
    expected = torch.ones(4, G * G).scatter_(1, order[:, :model.num_visible(0.75)], 0.0)
    assert torch.equal(visualize.panels(model, teacher, images, mask_ratio=0.75, seed=3).mask, expected)


def test_attention_panels_vary_and_state_is_left_alone(loaded):
    model, teacher, _, images = loaded
    model.train()
    rng = torch.get_rng_state()
    grids = visualize.panels(model, teacher, images).grids
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    for grid in grids:
        for i in (2, 4):  # teacher and student attention
            assert len(np.unique(panel(grid, i).reshape(-1, 3), axis=0)) > 1
    model.eval()


def test_panels_with_compiled_blocks_equal_eager_ones(loaded):
    """Training compiles the blocks; the panels drawn then are the eager model's (no hooks to miss calls)."""
    model, teacher, _, images = loaded
    eager = visualize.panels(model, teacher, images, attn_mask=True)
    model, teacher = copy.deepcopy(model), copy.deepcopy(teacher)
    for block in [*model.blocks, *model.decoder_blocks, *teacher.transformer.resblocks]:
        block.compile()
    compiled = visualize.panels(model, teacher, images, attn_mask=True)
    np.testing.assert_array_equal(compiled.grids, eager.grids)
    torch.testing.assert_close(compiled.mask, eager.mask)


def test_pixel_checkpoint_without_teacher(tmp_path, loaded):
    _, _, _, images = loaded
    model = models_milan.create_model('mae_vit_tiny_patch8', img_size=S, target='pixel', norm_pix_loss=True)
    path = tmp_path / 'pixel.pth'
    torch.save({'kind': 'pretrain', 'model': model.state_dict(), 'epoch': 0,
                'args': {'model': 'mae_vit_tiny_patch8', 'input_size': S, 'use_clip': False, 'norm_pix_loss': True}},
               path)
    model, teacher, _ = visualize.load_pretrain_checkpoint(str(path))
    assert teacher is None and model.norm_pix_loss
    out = visualize.panels(model, None, images, 0.5, seed=0)
    assert (panel(out.grids[0], 2) == visualize.GREY).all()  # no teacher: blank panel, random masking
    assert [name for name, _, _ in out.scales[0]] == ['loss (masked)', 'student attn']
    assert (out.mask.sum(1) == 8).all()


def test_bad_input_is_one_line(checkpoint, tmp_path):
    with pytest.raises(UserError, match='no such file'):
        run(['--checkpoint', str(tmp_path / 'missing.pth'), '--out_dir', str(tmp_path)])
    finetune = tmp_path / 'finetune.pth'
    torch.save({'kind': 'finetune', 'model': {}, 'epoch': 0}, finetune)
    with pytest.raises(UserError, match="not a pretraining checkpoint \\(kind 'finetune'\\); pass the pretraining"):
        run(['--checkpoint', str(finetune), '--out_dir', str(tmp_path)])
    with pytest.raises(UserError, match='no such file or folder'):
        run(['--checkpoint', checkpoint, '--images', str(tmp_path / 'nothing'), '--out_dir', str(tmp_path)])


def test_command_line_error_is_one_line(tmp_path, monkeypatch, capsys):
    """`python visualize.py` (its __main__ run in-process): one line on stderr, exit code 2."""
    monkeypatch.setattr(sys, 'argv', ['visualize.py', '--checkpoint', str(tmp_path / 'missing.pth'),
                                      '--out_dir', str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(os.path.join(ROOT, 'visualize.py'), run_name='__main__')
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f'error: checkpoint {tmp_path / "missing.pth"}: no such file\n'


@pytest.mark.parametrize('size,zoom', [(32, 5), (64, 3), (160, 1), (224, 1)])
def test_tensorboard_panels_are_large_enough_for_their_labels(size, zoom):
    """main_pretrain enlarges TensorBoard's panels to at least visualize.READABLE pixels, where every label fits
    uncut; a smaller zoom asked for is raised to that."""
    assert visualize.readable_zoom(size) == zoom and size * zoom >= visualize.READABLE
    assert visualize.panel_zoom(size, 1) == zoom and visualize.panel_zoom(size, zoom + 1) == zoom + 1
    labels = ('image', 'mask 75%', 'teacher attn', 'no teacher', 'loss (masked)', 'student attn',
              'colour scale (per image)')
    assert all(visualize.fit(label, visualize.READABLE) == label for label in labels)
    font = ImageFont.load_default(size=visualize.FONT_PX)
    cut = visualize.fit('a label far too long for the narrow cell it has', 90)
    assert cut.endswith('...') and font.getlength(cut) <= 90 and len(cut) > 6


def dark_columns(band):
    """x positions of a band with any pixel darker than the white canvas (drawn text)."""
    return set(np.nonzero((band < 200).any(axis=2).any(axis=0))[0].tolist())


def test_tensorboard_grid_cells_labels_and_colour_scale(loaded):
    """The grids main_pretrain writes (NHWC uint8, one per sample): six cells whose labels stay inside their cell,
    heat maps scaled per image to the colour map's ends, and a colour scale from high (top) to low with each map's
    range of that image."""
    model, teacher, _, images = loaded
    zoom = visualize.readable_zoom(S)
    out = visualize.panels(model, teacher, images, 0.75, seed=1, attn_mask=True, zoom=zoom)
    assert out.grids.shape == (4, HEIGHT, WIDTH, 3) and out.grids.dtype == np.uint8
    x_ranges = [set(range(origin(i)[0], origin(i)[0] + SIDE)) for i in range(6)]
    for grid in out.grids:
        for row in range(2):
            y = origin(3 * row)[1]
            drawn = dark_columns(grid[y - 14:y])
            cells = [x_ranges[3 * row + c] for c in range(3)]
            assert drawn and drawn <= set().union(*cells)  # every label inside a panel's width
            assert all(drawn & cell for cell in cells)  # and each cell has one

    x = to_device_normalized(images, torch.device('cpu'))
    _, importance = teacher(x)
    student = model.cls_attention(x)
    for n, grid in enumerate(out.grids):
        (name_t, lo_t, hi_t), (name_l, lo_l, hi_l), (name_s, lo_s, hi_s) = out.scales[n]
        assert (name_t, name_l, name_s) == ('teacher attn', 'loss (masked)', 'student attn')
        assert (lo_t, hi_t) == pytest.approx((importance[n].min().item(), importance[n].max().item()))
        assert (lo_s, hi_s) == pytest.approx((student[n].min().item(), student[n].max().item()))
        assert lo_l == 0 and hi_l > 0
        # the most and least attended patches take the colour map's two ends
        for i, values in ((2, importance[n]), (4, student[n])):
            heat = panel(grid, i)
            assert (patch(heat, values.argmax().item()) == visualize.COLORMAP[255]).all()
            assert (patch(heat, values.argmin().item()) == visualize.COLORMAP[0]).all()
        scale_x, scale_y = origin(5)
        bar = grid[scale_y + 2:scale_y + SIDE - 2, scale_x + 2]  # the bar's first column, top to bottom
        index = [int(np.nonzero((visualize.COLORMAP == colour).all(1))[0][-1]) for colour in bar]
        assert index[0] == 255 and index[-1] == 0 and all(a >= b for a, b in zip(index, index[1:]))
        assert dark_columns(grid[scale_y:scale_y + SIDE, scale_x + 30:scale_x + SIDE])  # the ranges' text


def test_title_names_the_checkpoint_and_its_epoch(checkpoint, loaded, tmp_path):
    """The PNG's top band: the file and its epoch (ours counted from 0; a mid-epoch stop says where; 'epoch ?' for a
    file that doesn't say), drawn as given, the rest of the grid unchanged."""
    model, teacher, _, images = loaded
    assert visualize.read_pretrain_checkpoint(checkpoint)[2] == 'checkpoint-last.pth: epoch 0 done'
    ckpt = torch.load(checkpoint, weights_only=True)
    torch.save({**ckpt, 'resume_iter': 3}, tmp_path / 'stopped.pth')
    assert visualize.read_pretrain_checkpoint(str(tmp_path / 'stopped.pth'))[2] == \
        'stopped.pth: stopped in epoch 0 at iteration 3'
    del ckpt['epoch']
    torch.save(ckpt, tmp_path / 'no_epoch.pth')
    assert visualize.read_pretrain_checkpoint(str(tmp_path / 'no_epoch.pth'))[2] == 'no_epoch.pth: epoch ?'

    title = 'checkpoint-last.pth: epoch 0 done'
    titled = visualize.panels(model, teacher, images[:1], seed=2, title=title).grids[0]
    plain = visualize.panels(model, teacher, images[:1], seed=2).grids[0]
    assert titled.shape == (TITLED, WIDTH, 3)
    np.testing.assert_array_equal(titled[22:], plain[4:])
    expected = Image.new('RGB', (WIDTH, 18), 'white')
    ImageDraw.Draw(expected).text((4, 4), title, fill='black', font=ImageFont.load_default(size=visualize.FONT_PX))
    np.testing.assert_array_equal(titled[:18], np.asarray(expected))


def test_released_mmpretrain_file_draws_as_its_import(checkpoint, tiny_data, tmp_path, capsys):
    """MMPretrain's MILAN file of the same weights (MMEngine's wrapping, no args) is read directly, decoder and all,
    as import-mae reads it: the same model and flags, the same picture under a title with MMEngine's epoch. Its
    teacher is the CLIP it carries (here the run's own random one), so no --clip_model and no download."""
    ours = visualize.load_pretrain_checkpoint(checkpoint)[0]
    mm = tmp_path / 'milan_mmpretrain.pth'
    write_mmpretrain_milan(mm, ours)
    model, args, title = visualize.read_pretrain_checkpoint(str(mm))
    assert title == 'milan_mmpretrain.pth: epoch 399 done'
    assert (args['use_clip'], args['change_decoder'], args['attn_mask'], args['mask_ratio']) == (True, True, True, 0.75)
    assert args['clip_model'] == str(mm)
    for key, value in ours.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    image = os.path.join(tiny_data, 'val', 'disc', 'disc_0001.JPEG')
    run(['--checkpoint', checkpoint, '--images', image, '--out_dir', str(tmp_path / 'ours')])
    capsys.readouterr()
    run(['--checkpoint', str(mm), '--images', image, '--out_dir', str(tmp_path / 'mm')])
    printed = capsys.readouterr().out
    assert 'milan_mmpretrain.pth: epoch 399 done' in printed and 'RANDOM' not in printed
    assert not os.path.exists(os.path.join(os.environ['XDG_CACHE_HOME'], 'clip'))  # nothing downloaded
    drawn = [np.asarray(Image.open(tmp_path / name / 'disc_0001.png')) for name in ('ours', 'mm')]
    np.testing.assert_array_equal(drawn[0][18:], drawn[1][18:])
    assert not np.array_equal(drawn[0][:18], drawn[1][:18])  # the titles differ
