"""How a vision stage turns per-image tokens and signals into fewer tokens.

Pure dispatch from a :class:`~vtc.plan.Stage`'s reducer to the operators in
:mod:`vtc.ops`; adapters call it with the signals they captured.
"""

from __future__ import annotations

import dataclasses

import torch

from . import ops
from .plan import Stage


def reduce_vision(
    stage: Stage, feats: torch.Tensor, scores: torch.Tensor | None, metric: torch.Tensor | None,
    protected: torch.Tensor | None = None, layout: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``stage`` to ``feats`` ``[I, n, D]``; returns the reduced features and, for each,
    its position among the ``n`` inputs (``[I, k]``, ascending).

    ``protected`` (bool ``[n]``, fewer than ``stage.keep`` set) marks tokens kept as they are
    (LLaVA-NeXT's row ends); the stage reduces the others to the rest of the budget.
    ``layout`` (``{name: [I, n]}``): where each token is in a tiled image, for ``hired``.

    Example:
        >>> from vtc.plan import Scorer, Stage
        >>> f = torch.randn(2, 16, 8)
        >>> reduce_vision(Stage("vision", Scorer("none"), 4, reducer="pool"), f, None, None)[1]
        tensor([[ 5,  7, 13, 15],
                [ 5,  7, 13, 15]])
    """
    if protected is not None and bool(protected.any()):
        fixed, free = protected.nonzero()[:, 0], (~protected).nonzero()[:, 0]
        inner = resized(stage, stage.keep - fixed.numel())
        scores, metric = (None if t is None else t[:, free] for t in (scores, metric))
        layout = None if layout is None else {k: v[:, free] for k, v in layout.items()}
        reduced, local = reduce_vision(inner, feats[:, free], scores, metric, layout=layout)
        index = torch.cat([fixed.expand(feats.shape[0], -1), free[local]], dim=1)
        index, order = index.sort(dim=1)
        both = torch.cat([feats[:, fixed], reduced], dim=1)
        return ops.gather_tokens(both, order), index
    if stage.reducer == "hired":
        alpha = dict(stage.options).get("alpha", 0.5)
        keep = torch.stack([ops.hired_select(scores[i], metric[i], layout["tile"][i], layout["region"][i],
                                             stage.keep, alpha) for i in range(feats.shape[0])])
        return ops.gather_tokens(feats, keep), keep
    if stage.reducer == "topk":
        keep = ops.topk_keep(scores, stage.keep)
        return ops.gather_tokens(feats, keep), keep
    if stage.reducer == "pool":
        return ops.pool_grid(feats, stage.keep)
    if stage.reducer == "merge":
        return ops.merge_to(feats, metric if metric is not None else feats, stage.keep)
    if stage.reducer == "dominant+context":
        dominant = dict(stage.options)["dominant"]
        return ops.dominant_and_context(feats, scores, metric if metric is not None else feats, dominant,
                                        stage.keep - dominant)
    raise ValueError(f"unknown reducer {stage.reducer!r}")


def resized(stage: Stage, keep: int) -> Stage:
    """``stage`` keeping ``keep`` tokens instead, its counts scaled alike (an image smaller than the
    plan's, or a budget shared with protected tokens).

    Example:
        >>> from vtc.plan import Scorer
        >>> s = Stage("vision", Scorer("cls_attention", (22,)), 64, reducer="dominant+context",
        ...           options=(("dominant", 54),))
        >>> resized(s, 32).options
        (('dominant', 27),)
    """
    if keep == stage.keep:
        return stage
    options = tuple((k, min(max(1, round(v * keep / stage.keep)), max(keep - 1, 1))) if k == "dominant" else (k, v)
                    for k, v in stage.options)
    return dataclasses.replace(stage, keep=keep, options=options)
