"""AIM: merge similar visual tokens before the LLM, then prune them progressively inside it."""

from __future__ import annotations

import dataclasses

from vtc.budget import resolve_count
from vtc.errors import BudgetError, VtcError
from vtc.plan import ModelInfo, Plan, Scorer, Stage
from vtc.registry import register_method

from .base import Method


def retain(layer: int, start: int, slope: float) -> float:
    """Fraction of the merged tokens that layer ``layer`` sees: 1 up to ``start``, then falling.

    Example:
        >>> [retain(j, 12, 0.125) for j in (12, 13, 16, 20, 25)]
        [1.0, 0.875, 0.5, 0.0, 0.0]
    """
    return max(0.0, min(1.0, 1.0 - slope * (layer - start)))


def equivalent_fraction(num_layers: int, start: int, slope: float) -> float:
    """Equivalent tokens of the in-LLM schedule, as a fraction of the tokens entering the LLM."""
    return sum(retain(j, start, slope) for j in range(num_layers)) / num_layers


@register_method
@dataclasses.dataclass
class AIM(Method):
    """Before the LLM: ToMe-style bipartite merging of each image's features (cosine
    similarity, size-weighted means), at most half the tokens per round, down to ``merged``
    tokens. Inside the LLM: layer ``j > start_layer`` keeps ``max(0, 1 - slope (j - start))`` of
    them, ranked by PageRank over layer ``j - 1``'s causal attention among all tokens
    (``iters`` iterations, ``temperature``, heads combined by RMS); text is always kept;
    tokens are physically dropped and keep their RoPE positions.

    Defaults: ``start_layer = 12 L / 32``, ``slope = 0.125 * 32 / L`` (so visual tokens are gone
    from ``20 L / 32`` on), ``iters=5``, ``temperature=0.1``; ``merged``: 252 of 576 (LLaVA-1.5)
    without a budget. A ``budget`` solves ``merged`` for the default schedule, or, when no merge
    is needed, the slope.

    Example:
        >>> from vtc.plan import ModelInfo
        >>> plan = AIM().compile(ModelInfo("llava", 576, 32, 24, 22, True))
        >>> plan.tokens_entering_llm, [s.keep for s in plan.layer_stages][:3], round(plan.equivalent_tokens, 1)
        (252, [220, 189, 158], 129.9)
    """

    name = "aim"
    summary = "merge before the LLM, then PageRank-prune progressively inside it (AIM)"

    merged: int | float | None = None
    start_layer: int | None = None
    slope: float | None = None
    iters: int = 5
    temperature: float = 0.1

    def compile(self, info: ModelInfo, budget=None) -> Plan:
        n, num = info.image_tokens, info.num_layers
        start = round(12 * num / 32) if self.start_layer is None else self.start_layer
        slope = 0.125 * 32 / num if self.slope is None else float(self.slope)
        if not 0 <= start < num - 1 or slope < 0:
            raise VtcError(f"aim start_layer={start}, slope={slope}: use a start in [0, {num - 2}] and slope >= 0")
        if budget is not None and self.merged is not None and self.slope is not None:
            raise BudgetError("aim: with a budget, give at most one of merged and slope (the other is solved)")
        if budget is None:
            merged = round(252 / 576 * n) if self.merged is None else self._count(self.merged, n)
        else:
            target = resolve_count(budget, n)
            if self.merged is not None:
                merged = self._count(self.merged, n)
                slope = self._solve_slope(num, start, target / merged, budget)
            else:
                merged = min(n, max(1, round(target / equivalent_fraction(num, start, slope))))
                if merged == n:
                    slope = self._solve_slope(num, start, target / n, budget)
        stages = []
        if merged < n:
            stages.append(Stage("vision", Scorer("none"), merged, reducer="merge", positions="compact"))
        last = merged
        for j in range(start + 1, num):
            keep = round(merged * retain(j, start, slope))
            if keep < last:
                options = (("iters", self.iters), ("temperature", self.temperature))
                scorer = Scorer("pagerank", (j - 1,), options=options)
                stages.append(Stage(f"layer:{j}", scorer, keep, positions="keep"))
                last = keep
            if keep == 0:
                break
        return self._plan(info, tuple(stages), budget)

    @staticmethod
    def _count(value, n: int) -> int:
        from vtc.budget import keep_count

        return keep_count(value, n, "merged")

    @staticmethod
    def _solve_slope(num: int, start: int, fraction: float, budget) -> float:
        lowest = (start + 1) / num
        if fraction < lowest:
            raise BudgetError(
                f"aim keeps every merged token up to layer {start}, so it cannot reach budget {budget!r} "
                f"without merging more: lower `merged` or `start_layer`"
            )
        lo, hi = 0.0, 1.0
        for _ in range(60):  # equivalent tokens fall as the slope grows: bisect
            mid = (lo + hi) / 2
            if equivalent_fraction(num, start, mid) > fraction:
                lo = mid
            else:
                hi = mid
        return hi
