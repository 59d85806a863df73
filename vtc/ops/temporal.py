"""Temporal pruning of a video's frames: DyCoke's token temporal merging (TTM; Tao et al., CVPR 2025)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def temporal_prune_counts(frames: int) -> tuple[int, int]:
    """``(whole, pruned)``: how many of a video's ``frames`` :func:`temporal_prune` keeps whole and how many it
    cuts to its per-frame count (with an odd count the last frame, without a partner, is dropped; a single frame
    is kept whole).

    Example:
        >>> [temporal_prune_counts(t) for t in (1, 2, 3, 8, 9, 32)]
        [(1, 0), (1, 1), (1, 1), (3, 5), (2, 6), (9, 23)]
    """
    if frames < 2:
        return frames, 0
    windows = len(range(0, frames - 4, 4))
    return frames // 2 - windows, frames // 2 + windows


def temporal_prune(frames: torch.Tensor, keep: int) -> torch.Tensor:
    """The tokens of a video ``frames`` ``[T, N, D]`` (``N`` tokens per frame) that DyCoke's TTM keeps: indices
    into the ``T * N`` flattened tokens, in its output order.

    The rule (KD-TAO/DyCoke @dd74634, ``llava/model/llava_arch.py`` L35-93, ``dycole_ttm``): per pair of frames
    ``(i, i + 1)``, ``i`` even, frame ``i`` stays whole and frame ``i + 1`` keeps its ``keep`` tokens least
    cosine-similar to frame ``i``'s token at the same position (``topk(largest=False)`` order: ascending
    similarity, not position order); a last frame without a partner (odd ``T``) is dropped. Then for each ``i``
    in ``range(0, T - 4, 4)`` (the last window of four is never processed), frame ``i + 2`` is cut the same way
    against frame ``i``. Frames are concatenated in order. The first comparison normalizes both frames before
    ``cosine_similarity`` and the second does not, as the official code (the values agree up to rounding).
    A single frame is returned whole (the official code fails on fewer than five frames: it stacks an empty list
    of similarities; here fewer frames just have fewer windows).

    Example:
        >>> frames = torch.tensor([[[1., 0], [0, 1], [1, 1]], [[1., 0], [1, 0], [-1, 0]]])  # 2 frames of 3 tokens
        >>> temporal_prune(frames, 2)  # frame 0 whole; frame 1's two least similar, least first
        tensor([0, 1, 2, 5, 4])
    """
    count, n, _ = frames.shape
    if not 0 <= keep <= n:
        raise ValueError(f"temporal_prune keeps between 0 and {n} tokens of a pruned frame, got {keep}")
    whole = torch.arange(n, device=frames.device)
    if count < 2:
        return whole[: count * n]

    def least_similar(first: torch.Tensor, second: torch.Tensor, normalize: bool) -> torch.Tensor:
        if normalize:
            first, second = F.normalize(first, p=2, dim=1), F.normalize(second, p=2, dim=1)
        return F.cosine_similarity(first, second, dim=1).topk(keep, largest=False).indices

    parts: dict[int, torch.Tensor] = {}
    for i in range(0, count - 1, 2):
        parts[i], parts[i + 1] = whole, least_similar(frames[i], frames[i + 1], normalize=True)
    for i in range(0, count - 4, 4):
        parts[i + 2] = least_similar(frames[i], frames[i + 2], normalize=False)
    return torch.cat([parts[f] + f * n for f in sorted(parts)])
