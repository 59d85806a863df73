"""Pool: average-pool each image's token grid to the budget before the LLM (baseline)."""

from __future__ import annotations

import dataclasses
import math

from vtc.errors import MethodNotApplicableError
from vtc.ops.grid import grid_fit
from vtc.ops.reduce import grid_shape
from vtc.plan import ModelInfo, Plan, Scorer, Stage
from vtc.registry import register_method

from .base import PreLLMTopK


@register_method
@dataclasses.dataclass
class Pool(PreLLMTopK):
    """2-D average pooling of the visual grid to ``rows x cols`` tokens, the largest grid within
    the budget with ``rows <= cols <= 2 rows`` (64 -> 8x8, 128 -> 8x16, 192 -> 12x16);
    positions compacted. Needs a square token grid (LLaVA-1.5), or one rectangular grid per image and per
    temporal group of a video (Qwen2.5-VL, Qwen3-VL: each grid pooled to :func:`vtc.ops.grid_fit` of its share
    of the budget, each pooled token at the position of its window's center token; the family keeps
    positions unless ``positions`` is given).

    Example:
        >>> from vtc.plan import ModelInfo
        >>> Pool().compile(ModelInfo("llava", 576, 32, 24, 22, True), 128).stages[0].keep
        128
    """

    name = "pool"
    summary = "2-D average pooling of each image's token grid to the budget (baseline)"

    positions: str = "compact"

    def compile(self, info: ModelInfo, budget=None) -> Plan:
        if info.tiled and not info.grids:
            raise MethodNotApplicableError(
                f"pool averages one square token grid per image (or one grid of any shape where the family "
                f"knows it, as Qwen); {info.family} images are tiled (use random, vtc_cls or merge as the "
                f"pre-LLM baseline there)"
            )
        keep = self.resolve_keep(info, budget)
        if info.grids:
            # Images of any shape (Qwen): each pools its own grid(s) to at most its share of the budget
            # (vtc.ops.pool_frames), so each image sizes itself; the plan counts what its (square) reference
            # image pools to.
            side = math.isqrt(info.image_tokens)
            if side * side == info.image_tokens:
                rows, cols = grid_fit(side, side, keep)
                keep = rows * cols
            stage = Stage("vision", Scorer("none"), keep, reducer="pool", positions=self.positions,
                          options=(("own_count", 1),))
            return self._plan(info, (stage,), budget)
        rows, cols = grid_shape(keep)
        stage = Stage("vision", Scorer("none"), rows * cols, reducer="pool", positions=self.positions)
        return self._plan(info, (stage,), budget)
