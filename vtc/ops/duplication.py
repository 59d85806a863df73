"""Duplication-aware selection of visual tokens (DART, Wen et al., EMNLP 2025)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pivot_shares(extra: int, pivots: int) -> list[int]:
    """How many tokens each of ``pivots`` pivots adds, ``extra`` in all: ``extra // pivots`` each
    (the official ``TOKEN_TOPK``), the remainder one more to the first pivots.

    Example:
        >>> pivot_shares(128, 8), pivot_shares(130, 8)
        ([16, 16, 16, 16, 16, 16, 16, 16], [17, 17, 16, 16, 16, 16, 16, 16])
    """
    if pivots <= 0:
        return []
    base, rest = divmod(max(0, extra), pivots)
    return [base + (i < rest) for i in range(pivots)]


def dart_select(
    keys: torch.Tensor,
    hidden: torch.Tensor,
    image: torch.Tensor,
    text: torch.Tensor,
    keep: int,
    pivot_image: int = 4,
    pivot_text: int = 4,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """The rows of ``image`` DART keeps: pivots, then the tokens least similar to each pivot.

    ``keys`` ``[n, C]`` are the rows' attention keys (heads concatenated) and ``hidden`` ``[n, D]``
    their hidden states (DART: the previous layer's output after the final norm); ``image`` holds
    the image's row indices and ``text`` the candidate text rows (DART: the rows after the image).
    Pivots: the ``pivot_image`` image rows and ``pivot_text`` text rows of largest key L1 norm.
    Taking the pivots in the iteration order of a Python ``set`` of their ``positions`` (the rows'
    indices in the sequence, default the row indices; image pivots inserted first, as the official
    code builds it), each pivot adds the image rows of lowest cosine similarity to it among those
    not yet kept: ``keep - pivot_image`` in all, shared by :func:`pivot_shares`. Returns the kept
    image rows in ascending order (``min(keep, len(image))`` of them; the image pivots first count
    against ``keep``).

    Example:
        >>> keys = torch.tensor([[9.0, 0], [1, 0], [1, 1], [0, 1], [0, 2], [5, 5]])
        >>> hidden = torch.tensor([[1.0, 0], [1, 0.1], [0, 1], [1, 1], [-1, 0], [0, 1]])
        >>> dart_select(keys, hidden, torch.arange(5), torch.tensor([5]), 3, pivot_image=1, pivot_text=1)
        tensor([0, 1, 4])
    """
    n_image = image.numel()
    keep = min(keep, n_image)
    if keep >= n_image:
        return image.clone()
    if keep <= 0:
        return image[:0]
    l1 = keys.float().abs().sum(dim=-1)
    n_piv_image = min(pivot_image, keep)
    n_piv_text = min(pivot_text, text.numel()) if keep > n_piv_image else 0
    image_pivots = image[l1[image].topk(n_piv_image).indices].tolist()
    text_pivots = text[l1[text].topk(n_piv_text).indices].tolist() if n_piv_text else []
    where = (torch.arange(keys.shape[0]) if positions is None else positions).tolist()
    row_at = {where[r]: r for r in image_pivots + text_pivots}
    # The official loop walks `list(set(image_indices + query_indices))` of sequence indices: the
    # order (hence which pivot claims a token first) is CPython's set order, reproduced here.
    order = [row_at[p] for p in set([where[r] for r in image_pivots] + [where[r] for r in text_pivots])]
    shares = pivot_shares(keep - n_piv_image, len(order))
    kept = set(image_pivots)
    free = torch.ones(n_image, dtype=torch.bool, device=image.device)
    position_of = {r: i for i, r in enumerate(image.tolist())}
    for r in image_pivots:
        free[position_of[r]] = False
    for pivot, share in zip(order, shares):
        left = free.nonzero()[:, 0]
        take = min(share, left.numel())
        if take <= 0:
            continue
        rows = image[left]
        sim = -F.cosine_similarity(hidden[pivot][None], hidden[rows], dim=-1)
        chosen = left[sim.topk(take).indices]
        free[chosen] = False
        kept.update(image[chosen].tolist())
    return torch.tensor(sorted(kept), dtype=image.dtype, device=image.device)
