"""DivPrune: keep a diverse subset of each image's tokens before the LLM (greedy max-min
diversity on the projected features; Alvar et al., CVPR 2025)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from vtc.plan import ModelInfo, Plan, Scorer, Stage
from vtc.registry import register_method

from .base import PreLLMTopK


@register_method
@dataclasses.dataclass
class DivPrune(PreLLMTopK):
    """Keep ``keep`` tokens per image chosen greedily for diversity (:func:`vtc.ops.divprune_select`:
    distance ``1 - cosine`` between projected features; first the token whose nearest neighbour is
    farthest, then each time the token farthest from those chosen), in original order; positions
    compacted. No attention is read, so it runs under any attention backend.

    Defaults: keep 0.098 of the tokens (the official ``SUBSET_RATIO``: 56 of 576), as
    vbdi/divprune's ``run_Divprune.sh``.

    Example:
        >>> from vtc.plan import ModelInfo
        >>> DivPrune().compile(ModelInfo("llava", 576, 32, 24, 22, True)).stages[0].keep
        56
    """

    name = "divprune"
    summary = "DivPrune: greedy max-min diversity (1 - cosine of projected features) per image before the LLM"

    default_keep: ClassVar[float] = 0.098
    positions: str = "compact"

    def compile(self, info: ModelInfo, budget=None) -> Plan:
        stage = Stage("vision", Scorer("none"), self.resolve_keep(info, budget), reducer="divprune",
                      positions=self.positions)
        return self._plan(info, (stage,), budget)
