"""FastV: after layer K-1, drop the image tokens the last prompt token attends to least."""

from __future__ import annotations

import dataclasses

from vtc.budget import keep_after_layer, resolve_count
from vtc.errors import BudgetError, VtcError
from vtc.plan import ModelInfo, Plan, Scorer, Stage
from vtc.registry import register_method

from .base import Method


@register_method
@dataclasses.dataclass
class FastV(Method):
    """Score = attention of the last prompt token to each image token at layer ``layer - 1``
    (mean over heads); keep the top ``keep`` per image from layer ``layer`` on; survivors keep
    their original RoPE positions; prefill only.

    Defaults (the paper's): ``layer=2``, ``keep=0.5``; a fractional ``keep`` is truncated,
    ``int(N * keep)``, as the official script does. A ``budget`` (equivalent tokens)
    solves ``keep = (budget * L - layer * N) / (L - layer)``; so FastV cannot go below
    ``layer / L`` of the tokens.

    Example:
        >>> from vtc.plan import ModelInfo
        >>> FastV().compile(ModelInfo("llava", 576, 32, 24, 22, True), budget=192).stages[0].keep
        166
    """

    name = "fastv"
    summary = "drop the least-attended image tokens inside the LLM after layer K-1 (FastV)"

    layer: int = 2
    keep: int | float | None = None
    positions: str = "keep"

    def compile(self, info: ModelInfo, budget=None) -> Plan:
        n, num_layers, k_layer = info.image_tokens, info.num_layers, self.layer
        if not 1 <= k_layer < num_layers:
            raise VtcError(f"fastv layer={k_layer}: use a layer in [1, {num_layers - 1}] (the paper uses 2)")
        if budget is not None and self.keep is not None:
            raise BudgetError("fastv: give either budget (equivalent tokens) or keep (tokens after the layer)")
        if budget is None:
            keep = max(1, int(resolve_count(self.keep if self.keep is not None else 0.5, n, "keep")))
        else:
            keep = keep_after_layer("fastv", budget, n, num_layers, k_layer)
        stage = Stage(f"layer:{k_layer}", Scorer("query_attention", (k_layer - 1,)), keep, positions=self.positions)
        return self._plan(info, (stage,), budget)
