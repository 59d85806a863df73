"""DyCoke: prune each video's frames against their neighbours before the LLM (token temporal merging, TTM;
Tao et al., CVPR 2025). Video only: images pass unchanged."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from vtc.budget import resolve_count
from vtc.errors import BudgetError, MethodNotApplicableError, VtcError
from vtc.ops.temporal import temporal_prune_counts
from vtc.plan import ModelInfo, Plan, Scorer, Stage
from vtc.registry import register_method

from .base import Method

# The frames of the official evaluation (lmms-eval llava_onevision ``max_frames_num=32``): the plan's printed count
# without a budget is that of such a video; each video sizes itself when it is reduced.
REFERENCE_FRAMES = 32
# The least share of a video's tokens TTM can keep: 1 whole frame of 5 (2 of 9, 3 of 13, ... never fewer).
LOWEST_SHARE = min(temporal_prune_counts(t)[0] / t for t in range(2, 4 * REFERENCE_FRAMES))


@register_method
@dataclasses.dataclass
class DyCoke(Method):
    """DyCoke's first stage, token temporal merging (TTM), only (:func:`vtc.ops.temporal_prune`): in each video,
    per pair of frames the second keeps its ``int(keep_ratio * N)`` tokens least cosine-similar to the first at
    the same position, then per window of four frames the third is cut the same way against the first; a last
    frame without a partner is dropped. The frames are a LLaVA-OneVision video's pooled grids (its newline kept
    after them), a Qwen2.5-VL/Qwen3-VL video's temporal groups (DeepStack features gathered alike). Images pass
    unchanged: the rule needs a temporal axis (families without video refuse the method). DyCoke's second stage
    (dynamic KV-cache pruning at each decode step) is not implemented (docs/methods/dycoke.md).

    Defaults as the official evaluation: ``keep_ratio`` 0.3 (lmms-eval's ``dycoke_k=0.7``, kept share
    ``1 - k``: 58 of 196 tokens). Positions compacted, with the kept tokens in DyCoke's order (ascending
    similarity within a pruned frame), as the official code on OneVision; where positions are kept (Qwen's
    default), in their original order, each at its own position.

    ``budget`` instead of ``keep_ratio``: each video keeps the budget's share of its tokens (the plan's fraction,
    :meth:`~vtc.plan.Plan.keeps_for`): its pruned frames keep the most tokens each, the same count for all, that
    fit within it. A video of ``T`` frames of ``N`` keeps at least its whole frames
    (:func:`vtc.ops.temporal_prune_counts`), so a budget below that share is refused with the video's feasible
    range; one above its reach keeps whole frames (and drops an odd last one). A full budget leaves the model
    unchanged.

    Example:
        >>> from vtc.plan import ModelInfo
        >>> info = ModelInfo("llava_onevision", 8154, 28, 26, 25, False, video=True)
        >>> DyCoke().compile(info).stages[0].reducer_label
        'dycoke(ratio=0.3, own_count=1)'
    """

    name = "dycoke"
    summary = "DyCoke's token temporal merging: each video's frames pruned against their neighbours (video only)"

    keep_ratio: float | None = None
    positions: str = "compact"

    default_ratio: ClassVar[float] = 0.3
    video_only = True

    def compile(self, info: ModelInfo, budget=None) -> Plan:
        if not info.video:
            raise MethodNotApplicableError(
                f"dycoke prunes a video's frames against one another, and {info.family} takes no video; on images "
                f"use a per-image method (random, merge, divprune, fastv)"
            )
        if budget is not None and self.keep_ratio is not None:
            raise BudgetError("dycoke: give either budget or keep_ratio, not both (both set what a pruned frame keeps)")
        n = info.image_tokens
        if budget is None:
            ratio = self.default_ratio if self.keep_ratio is None else self.keep_ratio
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
                raise VtcError(f"dycoke: keep_ratio={ratio!r} is the share of a pruned frame's tokens kept: use a "
                               f"number in [0, 1]")
            whole, pruned = temporal_prune_counts(REFERENCE_FRAMES)
            share = (whole + pruned * ratio) / REFERENCE_FRAMES
            # Kept below the model's count so the stage runs (a video reorders and may drop a frame at any ratio).
            keep = max(1, min(n - 1, round(share * n)))
            options = (("ratio", ratio), ("own_count", 1))
        else:
            keep = round(resolve_count(budget, n))
            if keep < LOWEST_SHARE * n:
                raise BudgetError(
                    f"dycoke keeps at least every video's whole frames, never fewer than {LOWEST_SHARE:.2f} of its "
                    f"tokens; budget {budget!r} is {keep / n:.3f} of them: use a budget in [{LOWEST_SHARE:.2f}, 1] "
                    f"(the exact floor of a video depends on its frame count), or keep_ratio"
                )
            options = (("own_count", 1),)
        stage = Stage("vision", Scorer("none"), keep, reducer="dycoke", positions=self.positions, options=options)
        return self._plan(info, (stage,), budget)
