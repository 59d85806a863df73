"""PyramidDrop: drop image tokens in stages inside the LLM, a pyramid of shrinking counts."""

from __future__ import annotations

import dataclasses

from vtc.budget import resolve_count
from vtc.errors import BudgetError, VtcError
from vtc.plan import ModelInfo, Plan, Scorer, Stage
from vtc.registry import register_method

from .base import Method


def pyramid_counts(n: int, ratio: float, stages: int) -> list[int]:
    """Tokens kept after each stage: ``int(n * ratio**i)`` (truncated, as the official
    ``modeling_llama_pdrop.py`` computes ``keep_length``), at least one.

    Example:
        >>> pyramid_counts(576, 0.5, 3), pyramid_counts(576, 0.4, 3)
        ([288, 144, 72], [230, 92, 36])
    """
    return [max(1, int(n * ratio**i)) for i in range(1, stages + 1)]


def equivalent(n: int, num_layers: int, layers: tuple[int, ...], counts: list[int]) -> float:
    """Equivalent tokens of a pyramid: each count held from its layer to the next."""
    bounds = [0, *layers, num_layers]
    held = [n, *counts]
    return sum(h * (b1 - b0) for h, b0, b1 in zip(held, bounds[:-1], bounds[1:])) / num_layers


def early_layers(num_layers: int) -> tuple[int, ...]:
    """The stage layers used for budgets the default ones cannot reach: 2, then evenly spaced.

    Example:
        >>> early_layers(32)
        (2, 12, 22)
    """
    step = (num_layers - 2) / 3
    return tuple(sorted({2, 2 + round(step), 2 + round(2 * step)} - {0} & set(range(1, num_layers))))


@register_method
@dataclasses.dataclass
class PyramidDrop(Method):
    """Before each of ``layers``, score image tokens by the last instruction token's attention
    computed with that layer's own ``input_layernorm``, ``q_proj``, ``k_proj`` and RoPE, and
    keep ``ratio`` of them; survivors are re-indexed contiguously.

    Defaults (the paper's): layers ``L/4, L/2, 3L/4`` (8, 16, 24 of 32), ``ratio=0.5``.
    A ``budget`` solves the ratio; a budget below what a first stage at ``L/4`` can reach
    (``N/4``) moves the stages to :func:`early_layers` unless ``layers`` is given.

    Example:
        >>> from vtc.plan import ModelInfo
        >>> plan = PyramidDrop().compile(ModelInfo("llava", 576, 32, 24, 22, True))
        >>> [s.keep for s in plan.stages], plan.equivalent_tokens
        ([288, 144, 72], 270.0)
    """

    name = "pdrop"
    summary = "pyramid of in-LLM drops by the last instruction token's attention (PyramidDrop)"

    layers: tuple[int, ...] | None = None
    ratio: float | None = None
    positions: str = "compact"

    def _layers(self, info: ModelInfo) -> tuple[int, ...]:
        num = info.num_layers
        layers = tuple(self.layers) if self.layers is not None else (num // 4, num // 2, 3 * num // 4)
        if not layers or list(layers) != sorted(set(layers)) or not all(0 < x < num for x in layers):
            raise VtcError(f"pdrop layers {list(layers)}: use strictly increasing layers in [1, {num - 1}]")
        return layers

    def compile(self, info: ModelInfo, budget=None) -> Plan:
        n, layers = info.image_tokens, self._layers(info)
        if budget is not None and self.layers is None:
            early = early_layers(info.num_layers)
            if resolve_count(budget, n) < equivalent(n, info.num_layers, layers, [1] * 3) and early != layers:
                # Below what a first stage at L/4 can reach: start at layer 2, the rest evenly after it.
                layers = early
        if budget is not None and self.ratio is not None:
            raise BudgetError("pdrop: give either budget or ratio, not both")
        if budget is None:
            ratio = 0.5 if self.ratio is None else float(self.ratio)
            if not 0 < ratio <= 1:
                raise VtcError(f"pdrop ratio={ratio}: use a keep ratio per stage in (0, 1]")
            counts = pyramid_counts(n, ratio, len(layers))
        else:
            counts = self._solve(info, layers, resolve_count(budget, n), budget)
        stages = tuple(
            Stage(f"layer:{k}", Scorer("query_attention", (k,)), c, positions=self.positions)
            for k, c in zip(layers, counts)
        )
        return self._plan(info, stages, budget)

    @staticmethod
    def _solve(info: ModelInfo, layers, target: float, budget) -> list[int]:
        n, num = info.image_tokens, info.num_layers
        lowest = equivalent(n, num, layers, [1] * len(layers))
        if target < lowest:
            raise BudgetError(
                f"pdrop with layers {list(layers)} keeps all {n} tokens before layer {layers[0]}, so it cannot "
                f"reach budget {budget!r}: the lowest feasible budget is {lowest:.1f} tokens; raise it or "
                f"start earlier (`layers`)"
            )
        lo, hi = 0.0, 1.0
        for _ in range(60):  # the equivalent tokens grow with the ratio: bisect
            mid = (lo + hi) / 2
            if equivalent(n, num, layers, [n * mid**i for i in range(1, len(layers) + 1)]) < target:
                lo = mid
            else:
                hi = mid
        # Truncate as pyramid_counts does, forgiving the bisection's last bits (a full budget ends a hair
        # under ratio 1 and must still keep every token).
        return [max(1, int(n * hi**i + 1e-6)) for i in range(1, len(layers) + 1)]
