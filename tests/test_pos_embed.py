"""util/pos_embed.py: MAE's fixed 2-D sin-cos position table and its resizing."""
import numpy as np
import torch

from util.pos_embed import interpolate_pos_embed, sincos_2d


def mae_reference_table(dim, grid):
    """An independent numpy float32 derivation of MAE's 2-D sin-cos table."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float32) / (d / 2.0))
        out = np.einsum('m,d->md', pos.reshape(-1).astype(np.float32), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    table = np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)
    return np.concatenate([np.zeros([1, dim], dtype=np.float32), table], axis=0)


def test_sincos_pos_embed_layout():
    table = sincos_2d(64, 14)
    assert table.shape == (197, 64) and table.dtype == torch.float32
    assert torch.count_nonzero(table[0]) == 0
    np.testing.assert_allclose(table.numpy(), mae_reference_table(64, 14), atol=1e-6)
    # patch 15 is row 1, column 1; patch 2 is row 0, column 2: first half follows the column
    assert torch.equal(table[1 + 2, :32], table[1 + 14 + 2, :32])
    assert torch.equal(table[1 + 14, 32:], table[1 + 14 + 5, 32:])


def test_pos_embed_interpolation():
    table = sincos_2d(32, 14)[None]
    assert torch.equal(interpolate_pos_embed(table, 14), table)
    bigger = interpolate_pos_embed(table, 24)
    assert bigger.shape == (1, 1 + 24 * 24, 32)
    assert torch.equal(bigger[:, 0], table[:, 0])
