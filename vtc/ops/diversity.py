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
