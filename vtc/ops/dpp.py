"""Conditional determinantal point process selection of visual tokens (CDPruner, Zhang et al.,
NeurIPS 2025)."""

from __future__ import annotations

import torch


def instruction_relevance(image: torch.Tensor, text: torch.Tensor, negative: bool = False) -> torch.Tensor:
    """Each image token's relevance to an instruction, min-max normalized to ``(0, 1]``, as CDPruner's
    kernel weights it.

    ``image`` is ``[n, D]`` (one image's tokens), ``text`` ``[M, D]`` (the instruction's embeddings, in the
    same space). The relevance of a token is its cosine similarity to each text embedding, averaged
    over them (negated first when ``negative``, as the official LLaVA code does with CLIP's embeddings),
    then ``(r - min + 1e-6) / (max - min)`` over the image. Computed in float32.

    Example:
        >>> img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> instruction_relevance(img, torch.tensor([[1.0, 0.0]])).round(decimals=3)
        tensor([1.0000, 0.0000, 0.7070])
    """
    image = image.float()
    text = text.float()
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    relevance = (image @ text.T).mean(dim=-1)
    if negative:
        relevance = -relevance
    return (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())


def dpp_select(features: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of ``k`` tokens of each image chosen by greedy MAP inference of the conditional DPP
    whose kernel is ``relevance_i * cos(f_i, f_j) * relevance_j``, in original (ascending) order.

    ``features`` is ``[I, n, D]`` (one image per leading index), ``relevance`` ``[I, n]``
    (:func:`instruction_relevance`). The greedy rule is fast MAP inference (Chen et al., 2018):
    each step picks the token with the largest remaining gain ``d_j^2`` (ties to the earlier token),
    then updates every gain by the new pick's Cholesky row. Computed in float32. Once the picks span
    the kernel's rank (more picks than the feature width) a gain is no longer positive; the official
    loop then divides by its square root (NaN, repeated picks), here that step updates nothing, so
    the remaining picks go by the gains left and never repeat a token.

    Example:
        >>> x = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]]])
        >>> dpp_select(x, torch.tensor([[1.0, 0.8, 0.9, 0.5]]), 2)
        tensor([[0, 2]])
    """
    count, n = features.shape[0], features.shape[1]
    if not 0 < k <= n:
        raise ValueError(f"k={k} must be in [1, {n}]")
    if k == n:
        return torch.arange(n, device=features.device).expand(count, n).clone()
    unit = features.float()
    unit = unit / unit.norm(dim=-1, keepdim=True)
    similarity = unit @ unit.transpose(1, 2)
    relevance = relevance.float()
    kernel = relevance[:, :, None] * similarity * relevance[:, None, :]
    rows = torch.arange(count, device=features.device)
    cis = torch.zeros(k, count, n, device=features.device)
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    picked = torch.zeros(count, n, dtype=torch.bool, device=features.device)
    out = torch.empty(k, count, dtype=torch.long, device=features.device)
    for i in range(k):
        j = gains.masked_fill(picked, float("-inf")).argmax(dim=-1)
        out[i] = j
        gain = gains[rows, j]
        usable = gain > 0  # the official divides by sqrt(gain) regardless
        eis = (kernel[rows, j] - torch.einsum("tb,tbn->bn", cis[:i, rows, j], cis[:i])) \
            / torch.sqrt(gain.clamp(min=torch.finfo(gain.dtype).tiny)).unsqueeze(-1)
        eis = torch.where(usable[:, None], eis, torch.zeros_like(eis))
        cis[i] = eis
        gains = gains - eis.square()
        picked[rows, j] = True
    return out.T.sort(dim=-1).values
