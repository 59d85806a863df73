"""How a vision stage turns per-image tokens and signals into fewer tokens.

Pure dispatch from a :class:`~vtc.plan.Stage`'s reducer to the operators in
:mod:`vtc.ops`; adapters call it with the signals they captured.
"""

from __future__ import annotations

import torch

from . import ops
from .plan import Stage


def reduce_vision(
    stage: Stage, feats: torch.Tensor, scores: torch.Tensor | None, metric: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``stage`` to ``feats`` ``[I, n, D]``; returns the reduced features and, for each,
    its position among the ``n`` inputs (``[I, k]``, ascending).

    Example:
        >>> from vtc.plan import Scorer, Stage
        >>> f = torch.randn(2, 16, 8)
        >>> reduce_vision(Stage("vision", Scorer("none"), 4, reducer="pool"), f, None, None)[1]
        tensor([[ 5,  7, 13, 15],
                [ 5,  7, 13, 15]])
    """
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
