"""Downsampling an image so that a vision tower itself produces fewer tokens (the baseline of
VTC-Bench, Liao et al., 2025)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def downsampled_grid(rows: int, cols: int, k: int) -> tuple[int, int]:
    """The token grid ``(rows', cols')`` of the image resized to at most ``k`` tokens, keeping its aspect
    as near as whole tokens allow: ``rows'`` is ``rows * s`` rounded down or up (``s = sqrt(k / (rows *
    cols))``), ``cols' = min(cols, k // rows')``, whichever gives more tokens (ties: the aspect nearer the
    image's, then rounding down).

    Example:
        >>> downsampled_grid(24, 24, 64), downsampled_grid(24, 24, 128), downsampled_grid(12, 12, 48)
        ((8, 8), (11, 11), (6, 8))
    """
    if not 0 < k <= rows * cols:
        raise ValueError(f"k={k} must be in [1, {rows * cols}]")
    scale = math.sqrt(k / (rows * cols)) * rows
    options = []
    for r in sorted({max(1, min(rows, math.floor(scale))), max(1, min(rows, math.ceil(scale)))}):
        c = max(1, min(cols, k // r))
        options.append((-(r * c), round(abs(math.log(r * cols / (c * rows))), 9), r, c))
    return min(options)[2:]


def grid_centres(rows: int, cols: int, new_rows: int, new_cols: int, device=None) -> torch.Tensor:
    """For each token of a ``new_rows x new_cols`` grid (raster order), the token of the ``rows x cols``
    grid at the centre of the area it covers (the same image resized), as a raster index; ascending.

    Example:
        >>> grid_centres(4, 4, 2, 2).tolist()
        [5, 7, 13, 15]
    """
    def centres(size: int, bins: int) -> list[int]:
        # Bin i spans [floor(i*size/bins), ceil((i+1)*size/bins)), as adaptive pooling.
        return [((i * size // bins) + (-(-(i + 1) * size // bins))) // 2 for i in range(bins)]

    return torch.tensor([r * cols + c for r in centres(rows, new_rows) for c in centres(cols, new_cols)],
                        device=device)


def resize_images(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Images ``[..., C, H, W]`` resized to ``height x width`` (bicubic, antialiased, as PIL resizes);
    computed in float32, returned in the input's dtype. Normalized pixels may be resized directly:
    the interpolation weights sum to one, so it commutes with the per-channel normalization.

    Example:
        >>> resize_images(torch.ones(1, 3, 8, 8), 4, 2).shape
        torch.Size([1, 3, 4, 2])
    """
    lead = pixels.shape[:-3]
    flat = pixels.reshape(-1, *pixels.shape[-3:]).float()
    out = F.interpolate(flat, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return out.to(pixels.dtype).reshape(*lead, *out.shape[-3:])
