"""Reducers that change features, not only select them: pooling and merging to a count.

Each takes per-image tokens ``x`` ``[I, N, D]`` and returns the reduced tokens with, for
each output token, the original index it stands at (``[I, k]``, ascending), so that a
caller can keep the matching placeholders and report what survived.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .merge import bipartite_soft_matching, merge_weighted
from .select import gather_tokens, topk_keep


def grid_shape(k: int) -> tuple[int, int]:
    """The pooled grid ``(rows, cols)`` with the most cells ``<= k``, rows ``<= cols <= 2 rows``.

    Example:
        >>> grid_shape(64), grid_shape(192), grid_shape(128), grid_shape(5)
        ((8, 8), (12, 16), (8, 16), (2, 2))
    """
    best = (1, 1)
    for rows in range(1, math.isqrt(k) + 1):
        cols = min(k // rows, 2 * rows)
        if rows * cols > best[0] * best[1]:
            best = (rows, cols)
    return best


def _centers(size: int, bins: int) -> list[int]:
    # Bin i of adaptive pooling spans [floor(i*size/bins), ceil((i+1)*size/bins)).
    return [((i * size // bins) + (-(-(i + 1) * size // bins))) // 2 for i in range(bins)]


def pool_grid(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the square token grid to the :func:`grid_shape` of ``k`` cells.

    Each output stands at the input token nearest its window's center.

    Example:
        >>> y, idx = pool_grid(torch.arange(16.).view(1, 16, 1), 4)
        >>> y.squeeze(-1), idx
        (tensor([[ 2.5000,  4.5000, 10.5000, 12.5000]]), tensor([[ 5,  7, 13, 15]]))
    """
    n, side = x.shape[1], math.isqrt(x.shape[1])
    if side * side != n:
        raise ValueError(f"pool_grid needs a square grid of tokens, got {n}")
    rows, cols = grid_shape(k)
    grid = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
    pooled = F.adaptive_avg_pool2d(grid.float(), (rows, cols)).to(x.dtype).flatten(2).transpose(1, 2)
    index = torch.tensor([r * side + c for r in _centers(side, rows) for c in _centers(side, cols)],
                         device=x.device)
    return pooled, index.expand(x.shape[0], -1)


def merge_to(x: torch.Tensor, metric: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens by repeated bipartite soft matching on ``metric`` until ``k`` remain.

    Each round merges at most half the tokens; means are weighted by how many original
    tokens each already holds (ToMe's size weighting).

    Example:
        >>> x = torch.randn(2, 16, 8)
        >>> y, idx = merge_to(x, x, 5)
        >>> y.shape, idx.shape
        (torch.Size([2, 5, 8]), torch.Size([2, 5]))
    """
    index = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    size = None
    while x.shape[1] > k:
        merge, _ = bipartite_soft_matching(metric, min(x.shape[1] - k, x.shape[1] // 2))
        x, new_size = merge_weighted(merge, x, size)
        metric = merge_weighted(merge, metric, size)[0]
        index, size = gather_tokens(index, merge.survivors), new_size
    return x, index


def dominant_and_context(
    x: torch.Tensor, scores: torch.Tensor, metric: torch.Tensor, dominant: int, context: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's reduction: the ``dominant`` best-scored tokens, plus ``context`` tokens
    each the mean of a group of the rest, grouped by the most similar of ``context`` evenly
    spaced targets (cosine similarity of ``metric``).

    Example:
        >>> x = torch.randn(1, 16, 4)
        >>> y, idx = dominant_and_context(x, torch.rand(1, 16), x, dominant=3, context=2)
        >>> y.shape, idx.shape
        (torch.Size([1, 5, 4]), torch.Size([1, 5]))
    """
    bsz, n, _ = x.shape
    keep = topk_keep(scores, dominant)
    rest_mask = torch.ones(bsz, n, dtype=torch.bool, device=x.device)
    rest_mask.scatter_(1, keep, False)
    rest = rest_mask.nonzero()[:, 1].view(bsz, n - dominant)
    if context == 0 or rest.shape[1] == 0:
        return gather_tokens(x, keep), keep
    step = rest.shape[1] / context
    targets = rest[:, [int(i * step) for i in range(context)]]  # evenly spaced among the rest
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    sim = gather_tokens(unit, rest) @ gather_tokens(unit, targets).transpose(1, 2)  # [B, R, C]
    group = sim.argmax(dim=-1)  # each remaining token (targets included) joins its best target
    sums = x.new_zeros(bsz, context, x.shape[2]).scatter_add_(
        1, group[..., None].expand(-1, -1, x.shape[2]), gather_tokens(x, rest))
    counts = x.new_zeros(bsz, context, 1).scatter_add_(1, group[..., None], x.new_ones(bsz, rest.shape[1], 1))
    contextual = sums / counts.clamp_min(1)
    index = torch.cat([keep, targets], dim=1)
    order = index.argsort(dim=1)
    return gather_tokens(torch.cat([gather_tokens(x, keep), contextual], dim=1), order), gather_tokens(index, order)
