"""Token merging by bipartite soft matching (the ToMe rule), as pure closures."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .select import gather_tokens


def bipartite_soft_matching(
    metric: torch.Tensor, r: int
) -> tuple[Callable[..., torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """Plan the merge of ``r`` tokens per sample by bipartite soft matching.

    Tokens alternate into sets A (even positions) and B (odd). Each A token finds its most
    cosine-similar B token under ``metric`` ``[B, N, C]``; the ``r`` A tokens with the most
    similar partners are merged into them. Returns closures ``merge(x, mode="mean")`` taking
    any ``[B, N, C']`` tensor to ``[B, N - r, C']`` (survivors in original order; ``mode`` is
    ``"mean"`` or ``"sum"``) and ``unmerge(y)`` taking it back to ``[B, N, C']``, each merged
    token copying its destination. ``merge.survivors`` holds the original index of each
    output token. For size-weighted means use :func:`merge_weighted`.

    Example:
        >>> x = torch.tensor([[[1., 0.], [1., 0.1], [0., 1.], [0.1, 1.]]])
        >>> merge, unmerge = bipartite_soft_matching(x, r=1)
        >>> merge(x).shape, unmerge(merge(x)).shape
        (torch.Size([1, 3, 2]), torch.Size([1, 4, 2]))
    """
    bsz, n, _ = metric.shape
    r = min(r, n // 2)
    device = metric.device
    a_pos = torch.arange(0, n, 2, device=device)
    b_pos = torch.arange(1, n, 2, device=device)
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        sim = unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2)  # [B, |A|, |B|]
        best, partner = sim.max(dim=-1)
        order = best.argsort(dim=-1, descending=True, stable=True)
        src = order[:, :r]  # A tokens merged away (indices into A)
        kept_a = order[:, r:].sort(dim=-1).values
        dst = partner.gather(-1, src)  # their destinations (indices into B)
        # Survivors in original order: kept A tokens and every B token.
        survivors = torch.cat([a_pos[kept_a], b_pos.expand(bsz, -1)], dim=1)
        out_order = survivors.argsort(dim=-1)

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        xa, xb = x[:, ::2], x[:, 1::2]
        c = x.shape[-1]
        moved = gather_tokens(xa, src)
        xb = xb.scatter_reduce(1, dst[..., None].expand(-1, -1, c), moved, reduce=mode, include_self=True)
        out = torch.cat([gather_tokens(xa, kept_a), xb], dim=1)
        return gather_tokens(out, out_order)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        c = y.shape[-1]
        y = y.gather(1, out_order.argsort(dim=-1)[..., None].expand(-1, -1, c))  # back to [kept A, B]
        ya, yb = y[:, : kept_a.shape[1]], y[:, kept_a.shape[1] :]
        full = y.new_zeros(bsz, n, c)
        full[:, 1::2] = yb
        a_full = y.new_zeros(bsz, a_pos.numel(), c)
        a_full.scatter_(1, kept_a[..., None].expand(-1, -1, c), ya)
        a_full.scatter_(1, src[..., None].expand(-1, -1, c), gather_tokens(yb, dst))
        full[:, ::2] = a_full
        return full

    merge.survivors = survivors.gather(1, out_order)  # original index of each output token
    return merge, unmerge


def merge_weighted(
    merge: Callable[..., torch.Tensor], x: torch.Tensor, size: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x`` as a size-weighted mean; returns ``(merged x, merged sizes)``.

    ``size`` ``[B, N, 1]`` counts how many original tokens each token already stands for
    (ones when ``None``), so that repeated merges average over original tokens.

    Example:
        >>> x = torch.tensor([[[1., 0.], [1., 0.], [0., 1.], [0., 1.]]])
        >>> merge, _ = bipartite_soft_matching(x, r=2)
        >>> merge_weighted(merge, x)[1].squeeze(-1)
        tensor([[2., 2.]])
    """
    if size is None:
        size = torch.ones_like(x[..., :1])
    merged = merge(x * size, mode="sum")
    new_size = merge(size, mode="sum")
    return merged / new_size, new_size


def tome_matching(
    metric: torch.Tensor, r: int, class_token: bool = True
) -> Callable[..., torch.Tensor]:
    """ToMe's bipartite soft matching as it runs inside a ViT block (Bolya et al., ICLR 2023).

    Tokens alternate into sets A (even positions) and B (odd); each A token's edge goes to its
    most cosine-similar B token under ``metric`` ``[B, N, C]``; the ``r`` A tokens with the
    strongest edges are merged into their B partners (at most half the unprotected tokens).
    With ``class_token`` the first token (in A) never merges. Returns ``merge(x, mode="mean")``
    taking any ``[B, N, C']`` tensor to ``[B, N - r, C']`` in ToMe's order: the unmerged A
    tokens (in their original order, so the class token stays first), then every B token.
    ``mode`` is a ``scatter_reduce`` reduction (``"mean"``, ``"sum"``, ``"amin"``, ...); for
    size-weighted means use :func:`merge_weighted`. ``merge.r`` is the number merged.

    Unlike :func:`bipartite_soft_matching` (survivors in original order, for merging once
    before the LLM), this keeps the official token order, so stacked blocks reproduce ToMe.

    Example:
        >>> m = torch.tensor([[[1., 1.], [1., 0.], [1., 0.1], [0., 1.], [0.5, 1.]]])
        >>> merge = tome_matching(m, r=1)  # token 2 is closest to its partner: it merges into 1
        >>> merge(torch.arange(5.).view(1, 5, 1), mode="amin").flatten().tolist()  # [CLS], A, then B
        [0.0, 4.0, 1.0, 3.0]
    """
    n = metric.shape[1]
    r = max(0, min(r, (n - int(class_token)) // 2))
    if r == 0:
        def unchanged(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
            return x

        unchanged.r = 0
        return unchanged
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        sim = unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2)  # [B, |A|, |B|]
        if class_token:
            sim[:, 0] = -torch.inf
        best, partner = sim.max(dim=-1)
        ranked = best.argsort(dim=-1, descending=True)
        src, stay = ranked[:, :r], ranked[:, r:]
        if class_token:
            stay = stay.sort(dim=-1).values
        dst = partner.gather(-1, src)

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        a, b = x[:, ::2], x[:, 1::2]
        width = x.shape[-1]
        b = b.scatter_reduce(1, dst[..., None].expand(-1, -1, width), gather_tokens(a, src), reduce=mode)
        return torch.cat([gather_tokens(a, stay), b], dim=1)

    merge.r = r
    return merge
