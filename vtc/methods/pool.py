"""Pool: average-pool each image's token grid to the budget before the LLM (baseline)."""

from __future__ import annotations

import dataclasses

from vtc.errors import MethodNotApplicableError
from vtc.ops.reduce import grid_shape
from vtc.plan import ModelInfo, Plan, Scorer, Stage
from vtc.registry import register_method

from .base import PreLLMTopK


@register_method
@dataclasses.dataclass
class Pool(PreLLMTopK):
    """2-D average pooling of the visual grid to ``rows x cols`` tokens, the largest grid within
    the budget with ``rows <= cols <= 2 rows`` (64 -> 8x8, 128 -> 8x16, 192 -> 12x16);
    positions compacted. Needs a square token grid (LLaVA-1.5).

    Example:
        >>> from vtc.plan import ModelInfo
        >>> Pool().compile(ModelInfo("llava", 576, 32, 24, 22, True), 128).stages[0].keep
        128
    """

    name = "pool"
    summary = "2-D average pooling of each image's token grid to the budget (baseline)"

    positions: str = "compact"

    def compile(self, info: ModelInfo, budget=None) -> Plan:
        if info.tiled:
            raise MethodNotApplicableError(
                f"pool averages one square token grid per image; {info.family} images are tiled "
                f"(use random, vtc_cls or merge as the pre-LLM baseline there)"
            )
        rows, cols = grid_shape(self.resolve_keep(info, budget))
        stage = Stage("vision", Scorer("none"), rows * cols, reducer="pool", positions=self.positions)
        return self._plan(info, (stage,), budget)
