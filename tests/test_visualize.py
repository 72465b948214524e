"""visualize.py on a real pretraining checkpoint: the PNG layout, the exact mask panel, the attention maps,
image sources, and one-line errors."""
import copy
import os
import runpy
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont

import models_milan
import visualize
from conftest import ROOT
from util.data import to_device_normalized
from util.errors import UserError

S, P, G = 32, 8, 4  # input size, patch size, grid of the tiny test model
# The pinned layout: 5 panels of S x S, 4 px apart and around, a 14 px label band on top.
WIDTH, HEIGHT = 5 * S + 6 * 4, 14 + S + 2 * 4


def panel(grid, i):
    """Panel i (0 = image ... 4 = student attention) of one rendered grid."""
    x, y = 4 + i * (S + 4), 4 + 14
    return grid[y:y + S, x:x + S]


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
        assert image.mode == 'RGB' and image.size == (WIDTH, HEIGHT)
    assert 'carry no meaning' in capsys.readouterr().out


def test_files_and_the_demo_default(checkpoint, tiny_data, tmp_path):
    one = os.path.join(tiny_data, 'val', 'square', 'square_0001.JPEG')
    run(['--checkpoint', checkpoint, '--images', one, '--out_dir', str(tmp_path / 'files'), '--zoom', '2'])
    assert Image.open(tmp_path / 'files' / 'square_0001.png').size == (5 * 2 * S + 24, 14 + 2 * S + 8)
    run(['--checkpoint', checkpoint, '--num_images', '2', '--out_dir', str(tmp_path / 'demo')])
    assert sorted(os.listdir(tmp_path / 'demo')) == ['disc_0000.png', 'square_0000.png']


def test_mask_panel_greys_exactly_the_masked_patches(loaded):
    model, teacher, _, images = loaded
    out = visualize.panels(model, teacher, images, mask_ratio=0.75, seed=3, attn_mask=True)
    assert out.grids.shape == (4, HEIGHT, WIDTH, 3) and out.grids.dtype == np.uint8
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
    assert (out.mask.sum(1) == 8).all()


def test_bad_input_is_one_line(checkpoint, tmp_path):
    with pytest.raises(UserError, match='no such file'):
        run(['--checkpoint', str(tmp_path / 'missing.pth'), '--out_dir', str(tmp_path)])
    finetune = tmp_path / 'finetune.pth'
    torch.save({'kind': 'finetune', 'model': {}, 'epoch': 0}, finetune)
    with pytest.raises(UserError, match="not a pretraining checkpoint .*kind 'finetune'.*import-mae"):
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
    """main_pretrain enlarges TensorBoard's panels to at least visualize.READABLE pixels, where every label fits."""
    assert visualize.readable_zoom(size) == zoom and size * zoom >= visualize.READABLE
    font = ImageFont.load_default(size=visualize.LABEL_H - 3)
    widest = max(font.getlength(label) for label in ('image', 'mask 75%', 'teacher attn', 'no teacher',
                                                      'loss (masked)', 'student attn'))
    assert widest < visualize.READABLE
