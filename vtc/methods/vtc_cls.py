"""VTC-CLS: keep the patches the vision tower's [CLS] token attends to most, before the LLM."""

from __future__ import annotations

import dataclasses

from vtc.errors import MethodNotApplicableError, VtcError
from vtc.plan import ModelInfo, Plan, Scorer, Stage
from vtc.registry import register_method

from .base import PreLLMTopK


@register_method
@dataclasses.dataclass
class VtcCls(PreLLMTopK):
    """Score = [CLS]-to-patch attention, mean over heads, averaged over vision ``layers``;
    keep the top ``keep`` patches per image in raster order; positions compacted.

    Defaults: the three vision layers ending at the feature layer (LLaVA-1.5's CLIP-L/336:
    20, 21, 22), keep 1/3 (192 of 576).

    Example:
        >>> from vtc.plan import ModelInfo
        >>> info = ModelInfo("llava", 576, 32, 24, 22, True)
        >>> VtcCls().compile(info, budget=64).stages[0].scorer.layers
        (20, 21, 22)
    """

    name = "vtc_cls"
    summary = "[CLS]-attention top-k of each image's patches before the LLM (VTC-CLS)"

    layers: tuple[int, ...] | None = None
    positions: str = "compact"

    def compile(self, info: ModelInfo, budget=None) -> Plan:
        if not info.has_cls:
            raise MethodNotApplicableError(
                f"vtc_cls ranks patches by the vision tower's [CLS] attention, and this {info.family} "
                f"model's tower has no [CLS] token; use a method that does not need it (fastv, random)"
            )
        f = info.vision_feature_layer
        layers = tuple(self.layers) if self.layers is not None else tuple(range(max(0, f - 2), f + 1))
        bad = [layer for layer in layers if not 0 <= layer < info.vision_layers]
        if bad or not layers:
            raise VtcError(
                f"vtc_cls layers {list(layers)}: each must be a vision layer in [0, {info.vision_layers - 1}] "
                f"(the feature layer is {f})"
            )
        keep = self.resolve_keep(info, budget)
        stage = Stage("vision", Scorer("cls_attention", layers), keep, positions=self.positions)
        return self._plan(info, (stage,), budget)
