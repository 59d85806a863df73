"""Selecting and gathering tokens along the sequence, batched, with per-sample indices."""

from __future__ import annotations

import torch


def topk_keep(scores: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the ``k`` highest scores of each row, in original (ascending) order.

    ``scores`` is ``[B, N]``; ``valid`` (bool, ``[B, N]``) excludes entries from the choice.
    Ties go to the earlier token, so the result is deterministic.

    Example:
        >>> topk_keep(torch.tensor([[0.1, 0.9, 0.5, 0.7]]), 2)
        tensor([[1, 3]])
    """
    if not 0 < k <= scores.shape[-1]:
        raise ValueError(f"k={k} must be in [1, {scores.shape[-1]}]")
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    # A stable sort makes ties resolve by position, independent of the backend.
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[..., :k]
    return order.sort(dim=-1).values


def gather_tokens(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Gather ``x`` along ``dim`` with per-sample indices ``index`` of shape ``[B, k]``.

    Trailing dimensions of ``x`` after ``dim`` are carried along; a batch dimension of
    size 1 in ``x`` is broadcast to the batch of ``index``.

    Example:
        >>> x = torch.arange(12.).view(2, 3, 2)
        >>> gather_tokens(x, torch.tensor([[0, 2], [1, 2]]))[1]
        tensor([[ 8.,  9.],
                [10., 11.]])
    """
    dim = dim % x.dim()
    if x.shape[0] == 1 and index.shape[0] > 1:
        x = x.expand(index.shape[0], *x.shape[1:])
    shape = [index.shape[0]] + [1] * (dim - 1) + [index.shape[1]] + [1] * (x.dim() - dim - 1)
    idx = index.view(shape).expand(*x.shape[:dim], index.shape[1], *x.shape[dim + 1 :])
    return x.gather(dim, idx)


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-sample index lists of different lengths into ``[B, M]``, left-padded.

    A padding slot repeats the sample's first index (so gathering with it stays in range);
    the returned mask ``[B, M]`` is True there.

    Example:
        >>> left_pad([torch.tensor([0, 2, 5]), torch.tensor([1, 4])])
        (tensor([[0, 2, 5],
                [1, 1, 4]]), tensor([[False, False, False],
                [ True, False, False]]))
    """
    width = max(r.numel() for r in rows)
    out = torch.stack([torch.cat([r[:1].expand(width - r.numel()), r]) for r in rows])
    pad = torch.arange(width, device=out.device)[None] < torch.tensor([width - r.numel() for r in rows],
                                                                       device=out.device)[:, None]
    return out, pad


def runs(mask: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """Each run of consecutive True entries of a 2-D mask, row by row: ``(row, its indices)``.
    An image's placeholders in a prompt are such a run.

    Example:
        >>> [(b, r.tolist()) for b, r in runs(torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]]).bool())]
        [(0, [1, 2]), (0, [4]), (1, [0, 1])]
    """
    out = []
    for b, row in enumerate(mask):
        at = row.nonzero()[:, 0]
        if at.numel():
            breaks = (at[1:] != at[:-1] + 1).nonzero()[:, 0] + 1
            out += [(b, r) for r in torch.tensor_split(at, breaks.tolist())]
    return out
