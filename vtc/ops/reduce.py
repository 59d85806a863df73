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
    x: torch.Tensor, scores: torch.Tensor, metric: torch.Tensor, dominant: int, context: int,
    cls: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's reduction (official ``visionzip/clip_encoder.py``): ``[CLS]`` (when ``cls``
    ``[B, D]`` is given, it counts as one of the ``dominant`` tokens), the best-scored patches in
    grid order, then ``context`` contextual tokens.

    The patches left are split into ``context`` targets, every ``R // context``-th of the ``R``
    left from the first, and the others, each of which joins the target most cosine-similar
    to it under ``metric``; a contextual token is its target plus the mean of its group (just
    the target if the group is empty).

    Returns the tokens in that order and, for each, the input token it stands at (the
    dominant patches and the targets; ``[CLS]``, which is none of the inputs, takes the first
    input index used by no other output). The indices follow the tokens, so they are not
    ascending.

    Example:
        >>> x = torch.randn(1, 16, 4)
        >>> y, idx = dominant_and_context(x, torch.rand(1, 16), x, dominant=3, context=2, cls=torch.zeros(1, 4))
        >>> y.shape, idx.shape, bool((y[0, 0] == 0).all())
        (torch.Size([1, 5, 4]), torch.Size([1, 5]), True)
    """
    bsz, n, dim = x.shape
    patches = dominant - (cls is not None)
    empty = torch.zeros(bsz, 0, dtype=torch.long, device=x.device)
    keep = topk_keep(scores, patches) if patches > 0 else empty
    rest_mask = torch.ones(bsz, n, dtype=torch.bool, device=x.device)
    rest_mask.scatter_(1, keep, False)
    rest = rest_mask.nonzero()[:, 1].view(bsz, n - patches)
    parts, index = [gather_tokens(x, keep)], [keep]
    if context > 0 and rest.shape[1] > 0:
        left = rest.shape[1]
        step = max(1, left // context)
        local = torch.arange(0, left, step, device=x.device)[:context]
        is_target = torch.zeros(left, dtype=torch.bool, device=x.device)
        is_target[local] = True
        targets, members = rest[:, local], rest[:, ~is_target]
        unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        sim = gather_tokens(unit, members) @ gather_tokens(unit, targets).transpose(1, 2)  # [B, M, C]
        group = sim.argmax(dim=-1)
        sums = x.new_zeros(bsz, local.numel(), dim).scatter_add_(
            1, group[..., None].expand(-1, -1, dim), gather_tokens(x, members))
        counts = x.new_zeros(bsz, local.numel(), 1).scatter_add_(
            1, group[..., None], x.new_ones(bsz, members.shape[1], 1))
        parts.append(gather_tokens(x, targets) + sums / counts.clamp_min(1))
        index.append(targets)
    index = torch.cat(index, dim=1)
    if cls is not None:
        used = torch.zeros(bsz, n, dtype=torch.bool, device=x.device)
        used.scatter_(1, index, True)
        index = torch.cat([(~used).long().argmax(dim=1, keepdim=True), index], dim=1)
        parts.insert(0, cls[:, None].to(x.dtype))
    return torch.cat(parts, dim=1), index


def share(total: int, weights: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
    """Split ``total`` into integer parts proportional to ``weights``, none above its ``capacity``
    (largest remainders first; what a full part cannot take goes to the others).

    Example:
        >>> share(10, torch.tensor([3., 1., 0., 0.]), torch.tensor([5, 5, 5, 5]))
        tensor([5, 5, 0, 0])
        >>> share(4, torch.tensor([1., 1., 1.]), torch.tensor([9, 9, 9]))
        tensor([2, 1, 1])
    """
    parts = torch.zeros_like(capacity)
    open_ = capacity > 0
    left = min(int(total), int(capacity.sum()))
    while left > 0:
        w = torch.where(open_, weights.double(), 0.0)
        if not bool((w > 0).any()):  # nothing left to be proportional to: by room
            w = torch.where(open_, (capacity - parts).double(), 0.0)
        exact = w / w.sum() * left
        add = torch.minimum(exact.floor().long(), capacity - parts)
        spare = left - int(add.sum())
        if spare > 0:  # the largest remainders get one more, while there is room
            room = (w > 0) & (parts + add < capacity)
            order = torch.where(room, exact - exact.floor(), -1.0).argsort(descending=True, stable=True)
            add[order[: min(spare, int(room.sum()))]] += 1
        parts += add
        left -= int(add.sum())
        open_ = parts < capacity
    return parts


def hired_select(late: torch.Tensor, early: torch.Tensor, tile: torch.Tensor, region: torch.Tensor, keep: int,
                 alpha: float = 0.5, vote: int | None = None) -> torch.Tensor:
    """HiRED's choice of ``keep`` tokens of one high-resolution image, returned ascending.

    ``tile`` says which part of the image a token is in (0 the base image, 1.. its tiles);
    ``region`` which tile's area a base token shows. ``alpha`` of the budget goes to the base
    image, chosen by ``late`` score. The rest is shared among the tiles in proportion to how
    many of the base image's ``vote`` best ``early``-scored tokens (default: as many as there
    is budget for the tiles; the official code counts ``int(576 * (1 - alpha))``) lie in each
    tile's region, then each tile keeps its best ``late``-scored tokens.

    Example:
        >>> tile = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
        >>> region = torch.tensor([1, 1, 2, 2, 1, 1, 1, 2, 2, 2])
        >>> early = torch.tensor([9., 8., 0., 0., 0., 0., 0., 0., 0., 0.])  # region 1 matters
        >>> hired_select(torch.arange(10.), early, tile, region, keep=4)
        tensor([2, 3, 5, 6])
    """
    base = (tile == 0).nonzero()[:, 0]
    tiled = tile > 0
    kb = min(base.numel(), round(alpha * keep))
    kt = min(int(tiled.sum()), keep - kb)
    kb = keep - kt  # what the tiles cannot hold goes back to the base image
    chosen = [base[topk_keep(late[base][None], kb)[0]]] if kb else []
    if kt:
        ids = tile[tiled].unique()
        top = base[topk_keep(early[base][None], max(1, min(kt if vote is None else vote, base.numel())))[0]]
        counts = (region[top][:, None] == ids[None]).sum(dim=0)
        room = (tile[:, None] == ids[None]).sum(dim=0)
        for t, k in zip(ids.tolist(), share(kt, counts, room).tolist()):
            if k:
                mine = (tile == t).nonzero()[:, 0]
                chosen.append(mine[topk_keep(late[mine][None], k)[0]])
    return torch.cat(chosen).sort().values


def hired_official(late: torch.Tensor, early: torch.Tensor, tile: torch.Tensor, band: torch.Tensor,
                   rate: float = 0.2, alpha: float = 0.5) -> torch.Tensor:
    """HiRED's official selection for one LLaVA-NeXT image, returned ascending (its count is the
    official one, not a parameter).

    ``tile`` as :func:`hired_select` (0 the base image, ``1..T`` the tiles, ``-1`` row ends,
    never kept); ``band`` the tile the official code credits a base token to. As
    ``HiRED_token_selection``: budget ``int(crops * g * rate)`` with ``g`` the base image's
    tokens and ``crops = T + 1``; the base image keeps its ``min(int(budget * alpha), g)`` best
    ``late`` tokens; the tiles share ``min(rest, T g)`` in proportion to where the base
    image's ``int(g * (1 - alpha))`` best ``early`` tokens fall, each share truncated
    (``int()``, capped at ``g``), each tile keeping its best ``late`` tokens.

    Example:
        >>> tile = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
        >>> band = torch.tensor([1, 1, 2, 2, 1, 1, 1, 1, 2, 2, 2, 2])
        >>> early = torch.tensor([9., 8., 0., 0., 0., 0., 0., 0., 0., 0., 0., 0.])  # band 1 votes
        >>> hired_official(torch.arange(12.), early, tile, band, rate=0.5)  # budget 6: 3 + (3, 0)
        tensor([1, 2, 3, 5, 6, 7])
    """
    base = (tile == 0).nonzero()[:, 0]
    g, crops = base.numel(), int(tile.max()) + 1
    total = int(crops * g * rate)
    kb = min(int(total * alpha), g)
    kt = min(total - kb, (crops - 1) * g)
    chosen = [base[late[base].topk(kb).indices]]
    votes = base[early[base].topk(int(g * (1 - alpha))).indices]
    counts = torch.stack([(band[votes] == t).sum() for t in range(1, crops)]) if crops > 1 else None
    if kt > 0 and counts is not None and int(counts.sum()) > 0:
        shares = (counts / counts.sum() * kt).int().clamp(max=g)  # float32 and int(), as the official code
        for t, k in enumerate(shares.tolist(), start=1):
            mine = (tile == t).nonzero()[:, 0]
            chosen.append(mine[late[mine].topk(min(k, mine.numel())).indices])
    return torch.cat(chosen).sort().values
