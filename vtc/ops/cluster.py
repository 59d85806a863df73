"""Recycling pruned tokens into a few merged ones (SparseVLM's DPC-kNN clustering)."""

from __future__ import annotations

import torch


def recycled(dropped: int, share: float = 0.3, per_cluster: int = 10) -> tuple[int, int]:
    """How SparseVLM recycles ``dropped`` pruned tokens: the ``int(dropped * share) + 1`` most relevant
    of them are clustered into ``int(that / per_cluster) + 1`` merged tokens. Returns ``(recycled,
    clusters)``; ``(0, 0)`` when nothing was dropped.

    Example:
        >>> recycled(276), recycled(9), recycled(0)
        ((83, 9), (3, 1), (0, 0))
    """
    if dropped <= 0:
        return 0, 0
    chosen = min(dropped, int(dropped * share) + 1)
    return chosen, int(chosen / per_cluster) + 1


def recycle_split(n: int, total: int, share: float = 0.3, per_cluster: int = 10) -> int:
    """How many of ``n`` tokens to keep so that they and the merged tokens recycled from the rest
    (:func:`recycled`) number ``total``: the largest such count (at most ``total``).

    Example:
        >>> recycle_split(576, 309), recycle_split(576, 576), recycle_split(10, 3)
        (300, 576, 2)
    """
    if total >= n:
        return n
    k = total
    while k > 0 and k + recycled(n - k, share, per_cluster)[1] > total:
        k -= 1
    return k


def dpc_merge(x: torch.Tensor, clusters: int) -> torch.Tensor:
    """Merge tokens ``x`` ``[..., N, C]`` into ``clusters`` tokens each (``[..., clusters, C]``) by
    density-peak clustering (DPC-kNN), as SparseVLM's ``cluster_and_merge``: distances
    ``||x_i - x_j|| / sqrt(C)``; local density ``exp(-mean of the squared distances to the `clusters`
    nearest)`` (self included); each token's distance to the nearest denser token (the largest
    distance for the densest); the ``clusters`` tokens of largest ``distance * density`` are the
    centres, the others join the nearest centre; each merged token is its cluster's mean
    (``sum / (count + 1e-6)``, as the official code). Centres in that order.

    The official code adds ``1e-6 * rand`` to the densities to break ties; here ties go to the earlier
    token, so the result is deterministic.

    Example:
        >>> x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0], [5.0, 5.2]])
        >>> dpc_merge(x, 2).round(decimals=2)
        tensor([[0.0500, 0.0000],
                [5.0300, 5.0700]])
    """
    *lead, n, c = x.shape
    if not 0 < clusters <= n:
        raise ValueError(f"clusters={clusters} must be in [1, {n}]")
    xf = x.float().reshape(-1, n, c)
    dist = torch.cdist(xf, xf, compute_mode="donot_use_mm_for_euclid_dist") / c**0.5  # [B, N, N]
    nearest = dist.topk(clusters, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()  # [B, N]
    denser = density[:, None, :] > density[:, :, None]
    top = dist.flatten(1).max(dim=-1).values[:, None, None]
    parent = torch.where(denser, dist, top).min(dim=-1).values
    centres = (parent * density).topk(clusters, dim=-1).indices  # [B, k]
    assign = dist.gather(1, centres[..., None].expand(-1, -1, n)).argmin(dim=1)  # [B, N]
    assign.scatter_(1, centres, torch.arange(clusters, device=x.device).expand_as(centres))
    count = torch.zeros(assign.shape[0], clusters, device=x.device).scatter_add_(1, assign, torch.ones_like(xf[..., 0]))
    weight = 1.0 / (count + 1e-6).gather(1, assign)  # [B, N]
    merged = torch.zeros(assign.shape[0], clusters, c, device=x.device)
    merged.scatter_add_(1, assign[..., None].expand(-1, -1, c), xf * weight[..., None])
    return merged.reshape(*lead, clusters, c).to(x.dtype)
