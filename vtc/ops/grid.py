"""Pooling of rectangular token grids, one per temporal group (Qwen's images and videos)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reduce import _centers


def grid_fit(height: int, width: int, k: int) -> tuple[int, int]:
    """The pooled grid ``(rows, cols)`` for a ``height x width`` grid: the most cells ``<= k``, no larger than the
    grid, elongated along the grid's long side at least as much as the grid and at most twice as much (for a
    square grid: ``rows <= cols <= 2 rows``, as :func:`~vtc.ops.reduce.grid_shape`); a ``1 x min(long side, k)``
    strip along the long side when no such grid fits.

    Example:
        >>> grid_fit(24, 24, 128), grid_fit(32, 32, 256), grid_fit(8, 12, 6), grid_fit(12, 8, 6)
        ((8, 16), (16, 16), (2, 3), (3, 2))
    """
    if height > width:
        rows, cols = grid_fit(width, height, k)
        return cols, rows
    best = None
    for rows in range(1, height + 1):
        # cols / rows between width / height and twice that, within the grid and the budget.
        cols = min(width, k // rows, 2 * rows * width // height)
        if cols >= 1 and cols * height >= rows * width and (best is None or rows * cols > best[0] * best[1]):
            best = (rows, cols)
    return best or (1, max(1, min(width, k)))


def pool_frames(x: torch.Tensor, k: int, frame: torch.Tensor, row: torch.Tensor,
                col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool tokens ``x`` ``[I, n, D]`` that form, per image, ``T`` grids of ``H x W`` in raster order
    (``frame``, ``row``, ``col`` ``[I, n]``: each token's place; the same for every image of the call) to
    ``k // T`` cells per grid, each grid to its :func:`grid_fit`. Each output stands at the input token nearest
    its window's center (its original position, if positions are kept). Returns the pooled tokens and those
    indices (``[I, k']``, ascending, ``k' <= k``).

    Example:
        >>> f, r, c = (t.flatten()[None] for t in torch.meshgrid(torch.arange(2), torch.arange(2), torch.arange(4),
        ...                                                       indexing="ij"))
        >>> y, idx = pool_frames(torch.arange(16.).view(1, 16, 1), 4, f, r, c)  # 2 frames of 2x4 -> 1x2 each
        >>> y.squeeze(-1), idx
        (tensor([[ 2.5000,  4.5000, 10.5000, 12.5000]]), tensor([[ 5,  7, 13, 15]]))
    """
    count, n, dim = x.shape
    frames, height, width = (int(t[0].max()) + 1 for t in (frame, row, col))
    raster = (frame * height + row) * width + col
    if frames * height * width != n or not torch.equal(raster, torch.arange(n, device=x.device).expand_as(raster)):
        raise ValueError("pool needs each image's whole token grids in raster order: make pool the first vision stage")
    per = k // frames
    if per < 1:
        raise ValueError(f"pool keeps at least one token per temporal group: a budget of {k} tokens is below this "
                         f"video's {frames} groups; raise the budget")
    rows, cols = grid_fit(height, width, per)
    grid = x.view(count * frames, height, width, dim).permute(0, 3, 1, 2)
    pooled = F.adaptive_avg_pool2d(grid.float(), (rows, cols)).to(x.dtype)
    pooled = pooled.flatten(2).transpose(1, 2).reshape(count, frames * rows * cols, dim)
    cells = torch.tensor([r * width + c for r in _centers(height, rows) for c in _centers(width, cols)],
                         device=x.device)
    index = (torch.arange(frames, device=x.device)[:, None] * height * width + cells).flatten()
    return pooled, index.expand(count, -1)
