"""Fixed 2-D sine-cosine position embeddings in MAE's layout, so released checkpoints' tables match."""
import torch
import torch.nn.functional as F


def sincos_1d(dim, positions):
    """[N] positions -> [N, dim]: sin of every frequency, then cos of every frequency."""
    omega = torch.arange(dim // 2, dtype=torch.float32) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    angles = positions.float()[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim, grid_size, cls_token=True):
    """[1 + grid*grid, dim] table in row-major patch order; first half of the channels encodes the
    column coordinate, second half the row; the class slot (if any) is zeros."""
    if dim % 4:
        raise ValueError(f'sine-cosine position embedding needs a width divisible by 4, got {dim}')
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing='ij')
    table = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim), table], dim=0)
    return table


def interpolate_pos_embed(pos_embed, new_grid, num_prefix=1):
    """Resize a [1, prefix + g*g, D] table to a new grid (bicubic on the patch part); identity at the same size."""
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    old_grid = int(round(patches.shape[1] ** 0.5))
    if old_grid == new_grid:
        return pos_embed
    dim = patches.shape[-1]
    patches = patches.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(new_grid, new_grid), mode='bicubic', align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)
