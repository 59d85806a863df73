"""Diversity-based selection of visual tokens (DivPrune, Alvar et al., CVPR 2025)."""

from __future__ import annotations

import torch


def divprune_select(features: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of ``k`` tokens of each image chosen by DivPrune's greedy max-min diversity rule,
    in original (ascending) order.

    ``features`` is ``[..., n, D]`` (one image per leading index). The distance is
    ``1 - cosine similarity``, computed in the features' dtype. The first pick is the token whose
    nearest other token is farthest (the second-smallest entry of its distance column, the
    smallest being its own); each next pick is the token farthest from the picked set (largest
    minimum distance to it). Ties go to the earlier token (``argmax``). Tokens already picked
    are not picked again (the official loop could re-pick one only when every remaining token
    duplicates a picked one).

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
        >>> divprune_select(x, 2)
        tensor([0, 3])
    """
    n = features.shape[-2]
    if not 0 < k <= n:
        raise ValueError(f"k={k} must be in [1, {n}]")
    lead = features.shape[:-2]
    if k == n:
        return torch.arange(n, device=features.device).expand(*lead, n).clone()
    unit = features / features.norm(dim=-1, keepdim=True)
    dist = 1.0 - unit @ unit.transpose(-1, -2)  # [..., n, n], symmetric
    # First pick: the largest distance to the nearest other token (2nd smallest of each column).
    score = torch.topk(dist, 2, dim=-2, largest=False).values[..., 1, :]
    picked = torch.zeros(*lead, n, dtype=torch.bool, device=features.device)
    out = []
    nearest = None  # each token's distance to the closest picked token
    for _ in range(k):
        pick = score.masked_fill(picked, float("-inf")).argmax(dim=-1, keepdim=True)  # [..., 1]
        out.append(pick)
        picked.scatter_(-1, pick, True)
        row = dist.gather(-2, pick.unsqueeze(-1).expand(*lead, 1, n)).squeeze(-2)
        nearest = row if nearest is None else torch.minimum(nearest, row)
        score = nearest
    return torch.cat(out, dim=-1).sort(dim=-1).values


def vispruner_select(scores: torch.Tensor, features: torch.Tensor, k: int, important: int) -> torch.Tensor:
    """Indices of ``k`` tokens of each image chosen by VisPruner's rule, in original (ascending) order:
    the ``important`` tokens with the highest ``scores`` ([CLS] attention), then ``k - important``
    diverse tokens left from the rest by removing duplicates.

    ``scores`` is ``[I, n]``, ``features`` ``[I, n, D]``. The rest, ranked by descending score, is
    thinned in rounds until ``k - important`` remain: its even positions (``a``) and odd positions
    (``b``) are matched, each ``a`` scored by its largest cosine similarity to a ``b``, and the
    ``min(8, surplus)`` most similar ``a`` are dropped; the list for the next round is the kept
    ``a`` (in descending similarity) followed by every ``b``. Sorts are stable (ties to the earlier
    entry).

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [-1.0, 0.0], [0.9, 0.1]])
        >>> vispruner_select(torch.tensor([0.5, 0.1, 0.2, 0.15, 0.05]), x, 3, 1)
        tensor([0, 3, 4])
    """
    n = features.shape[-2]
    if not 0 < k <= n or not 0 <= important <= k:
        raise ValueError(f"k={k} must be in [1, {n}] and important={important} in [0, k]")
    lead = features.shape[:-2]
    if k == n:
        return torch.arange(n, device=features.device).expand(*lead, n).clone()
    order = scores.argsort(dim=-1, descending=True, stable=True)
    chosen, residual = order[..., :important], order[..., important:]
    unit = features / features.norm(dim=-1, keepdim=True)
    diverse = k - important
    while diverse > 0:
        size = residual.shape[-1]
        drop = min(8, size - diverse)
        if drop <= 0:
            break
        tokens = unit.gather(-2, residual.unsqueeze(-1).expand(*residual.shape, unit.shape[-1]))
        a, b = tokens[..., ::2, :], tokens[..., 1::2, :]
        similar = (a @ b.transpose(-1, -2)).max(dim=-1).values
        distinct = similar.argsort(dim=-1, descending=True, stable=True)[..., drop:]
        residual = torch.cat([residual[..., ::2].gather(-1, distinct), residual[..., 1::2]], dim=-1)
    keep = torch.cat([chosen, residual], dim=-1) if diverse > 0 else chosen
    return keep.sort(dim=-1).values
