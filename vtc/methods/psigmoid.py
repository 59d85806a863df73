"""P-Sigmoid and G-Search as method names: a sigmoid schedule by its parameters, or a searched file."""

from __future__ import annotations

import dataclasses
import math

from vtc.budget import resolve_count
from vtc.errors import BudgetError, VtcError
from vtc.plan import ModelInfo, Plan
from vtc.registry import register_method

from .base import Method
from .schedule import Schedule


def psigmoid(num_layers: int, r_min: float, slope: float, center: float) -> list[float]:
    """Keep fractions ``r(l) = r_min + (1 - r_min) / (1 + exp(s (l - c)))``, layer 0 keeping all.

    This formulation is ours: the paper names a parametric sigmoid of depth without its details.

    Example:
        >>> [round(f, 2) for f in psigmoid(6, 0.1, 2.0, 2.5)]
        [1.0, 0.96, 0.76, 0.34, 0.14, 0.11]
    """
    fracs = [r_min + (1 - r_min) / (1 + math.exp(max(-60.0, min(60.0, slope * (layer - center)))))
             for layer in range(num_layers)]
    return [1.0] + fracs[1:]


def solve_center(num_layers: int, r_min: float, slope: float, budget_fraction: float) -> float:
    """The center that makes the layer average of :func:`psigmoid` equal ``budget_fraction``.

    Example:
        >>> c = solve_center(32, 0.05, 0.5, 0.25)
        >>> round(sum(psigmoid(32, 0.05, 0.5, c)) / 32, 3)
        0.25
    """
    lo, hi = -1e6, 1e6  # a flat sigmoid (small slope) may need a far center
    for _ in range(200):  # the average grows with the center: bisect
        mid = (lo + hi) / 2
        if sum(psigmoid(num_layers, r_min, slope, mid)) / num_layers < budget_fraction:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def psigmoid_counts(num_layers: int, tokens: int, r_min: float, slope: float, fraction: float) -> list[int]:
    """Per-layer token counts of the sigmoid meeting ``fraction`` on average, never growing.

    Example:
        >>> psigmoid_counts(4, 16, 0.1, 2.0, 0.5)
        [16, 10, 4, 2]
    """
    fracs = psigmoid(num_layers, r_min, slope, solve_center(num_layers, r_min, slope, fraction))
    counts = [tokens] + [min(tokens, round(f * tokens)) for f in fracs[1:]]
    return [min(counts[: i + 1]) for i in range(num_layers)]


@register_method
@dataclasses.dataclass
class PSigmoid(Method):
    """Per-layer keep fractions shaped as a sigmoid of depth (``r_min``, ``slope``), its center
    solved so that the layer average meets the budget; applied like a schedule (stages where
    the count falls, ranked by the last instruction token's attention at that layer).
    ``vtc search psigmoid`` tunes ``r_min`` and ``slope`` by Bayesian optimization.

    Example:
        >>> from vtc.plan import ModelInfo
        >>> round(PSigmoid().compile(ModelInfo("llava", 576, 32, 24, 22, True), 128).equivalent_tokens)
        128
    """

    name = "psigmoid"
    summary = "per-layer keep fractions on a sigmoid of depth meeting the budget (P-Sigmoid)"

    r_min: float = 0.05
    slope: float = 0.5
    positions: str = "keep"

    def compile(self, info: ModelInfo, budget=None) -> Plan:
        n = info.image_tokens
        fraction = resolve_count(budget if budget is not None else 1 / 3, n) / n
        if not 0 <= self.r_min < 1 or self.slope <= 0:
            raise VtcError(f"psigmoid r_min={self.r_min}, slope={self.slope}: use 0 <= r_min < 1 and slope > 0")
        lowest = (1 + (info.num_layers - 1) * self.r_min) / info.num_layers
        if fraction < lowest - 0.5 / n:
            raise BudgetError(
                f"psigmoid keeps all tokens in layer 0 and at least r_min={self.r_min} after, so it cannot reach "
                f"budget {budget!r}: the lowest feasible budget is {lowest * n:.1f} tokens; lower r_min or raise it"
            )
        counts = psigmoid_counts(info.num_layers, n, self.r_min, self.slope, fraction)
        plan = Schedule({"counts": counts}, positions=self.positions).compile(info)
        return Plan(self.name, plan.stages, n, info.num_layers, {**dataclasses.asdict(self), "budget": budget})


@register_method
@dataclasses.dataclass
class GSearch(Schedule):
    """A schedule found by ``vtc search gsearch`` (``schedule=PATH``), applied like ``schedule``.

    Example:
        >>> from vtc.plan import ModelInfo
        >>> GSearch({"counts": [16, 8, 8, 4]}).compile(ModelInfo("t", 16, 4, 4, 2, True)).method
        'gsearch'
    """

    name = "gsearch"
    summary = "apply a G-Search schedule file (greedy per-layer counts within a tolerance)"
