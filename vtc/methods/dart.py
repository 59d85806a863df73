"""DART: prune duplicated image tokens inside the LLM at layer K (Wen et al., EMNLP 2025)."""

from __future__ import annotations

import dataclasses

from vtc.budget import keep_after_layer, resolve_count
from vtc.errors import BudgetError, VtcError
from vtc.plan import ModelInfo, Plan, Scorer, Stage
from vtc.registry import register_method

from .base import Method


@register_method
@dataclasses.dataclass
class DART(Method):
    """Before layer ``layer``: pivots are the ``pivot_image`` image tokens and ``pivot_text`` text
    tokens (those after the image) whose layer ``layer - 1`` keys have the largest L1 norm; each
    pivot then keeps the image tokens least cosine-similar to it (on layer ``layer - 1``'s output
    after the final norm) among those not yet kept (:func:`vtc.ops.dart_select`). Survivors keep
    their original RoPE positions; no attention weights are read, so it runs under flash attention.

    Defaults (the official LLaVA-1.5 scripts'): ``layer=2``, 4 + 4 pivots, ``truncation=128`` of
    576 (each pivot adds ``truncation // 8`` tokens: 4 + 128 = 132 kept). ``keep`` is the count
    kept from ``layer`` on (a fraction of the image: truncated); a ``budget`` (equivalent tokens)
    solves ``keep = (budget * L - layer * N) / (L - layer)`` as FastV's, the remainder of
    ``keep - pivot_image`` over the pivots going one more to the first pivots.

    Example:
        >>> from vtc.plan import ModelInfo
        >>> info = ModelInfo("llava", 576, 32, 24, 22, True)
        >>> DART().compile(info).stages[0].keep, DART().compile(info, budget=128).stages[0].keep
        (132, 98)
    """

    name = "dart"
    summary = "DART: keep pivots and the image tokens least similar to them inside the LLM at layer K"

    layer: int = 2
    keep: int | float | None = None
    truncation: int | None = None
    pivot_image: int = 4
    pivot_text: int = 4
    positions: str = "keep"

    def compile(self, info: ModelInfo, budget=None) -> Plan:
        n, num_layers, k_layer = info.image_tokens, info.num_layers, self.layer
        if not 1 <= k_layer < num_layers:
            raise VtcError(f"dart layer={k_layer}: use a layer in [1, {num_layers - 1}] (the paper uses 2)")
        if self.pivot_image < 1 or self.pivot_text < 0:
            raise VtcError(f"dart pivots ({self.pivot_image} image, {self.pivot_text} text): use at least one image "
                           f"pivot and no negative count")
        given = [name for name, v in (("budget", budget), ("keep", self.keep), ("truncation", self.truncation))
                 if v is not None]
        if len(given) > 1:
            raise BudgetError(f"dart: give one of budget, keep and truncation, not {' and '.join(given)}")
        pivots = self.pivot_image + self.pivot_text
        if budget is not None:
            keep = keep_after_layer("dart", budget, n, num_layers, k_layer)
        elif self.keep is not None:
            keep = max(1, int(resolve_count(self.keep, n, "keep")))
        else:
            # The official MAX_NUM_TRUNCTION (128 for 576 tokens): each pivot adds truncation // pivots.
            truncation = self.truncation if self.truncation is not None else round(128 * n / 576)
            keep = self.pivot_image + pivots * (int(truncation) // pivots)
        keep = min(keep, n)
        options = (("pivot_image", self.pivot_image), ("pivot_text", self.pivot_text))
        stage = Stage(f"layer:{k_layer}", Scorer("dart", (k_layer - 1,), options=options), keep,
                      positions=self.positions)
        return self._plan(info, (stage,), budget)
