"""VTC-CLS: keep the patches the vision tower's [CLS] token attends to most, before the LLM."""

from __future__ import annotations

import dataclasses

from vtc.errors import MethodNotApplicableError, VtcError
from vtc.plan import ModelInfo, Plan, Scorer, Stage
from vtc.registry import register_method

from .base import PreLLMTopK, no_cls_alternatives


def default_start(vision_layers: int, feature_layer: int) -> int:
    """The first vision layer VTC-CLS sums over: 16 of CLIP-L/336's 24 layers (the official
    ``--layer 16``), scaled to the tower's depth, at most the feature layer.

    Example:
        >>> default_start(24, 22), default_start(27, 25), default_start(4, 2)
        (16, 18, 2)
    """
    return min(feature_layer, round(16 * vision_layers / 24))


@register_method
@dataclasses.dataclass
class VtcCls(PreLLMTopK):
    """Score = [CLS]-to-patch attention, mean over heads, summed over vision ``layers``;
    keep the top ``keep`` patches per image in raster order; positions compacted.

    Defaults (the official VTC-CLS code, ``model_vqa_loader.py --layer 16``): the layers from
    ``start`` through the feature layer, i.e. ``attentions[16:-1]`` = layers 16..22 of
    CLIP-L/336's 24. ``start`` defaults to 16/24 of the tower's depth (rounded, at most the
    feature layer), so other towers sum over the same share of their depth. ``layers`` names
    the layers outright; negative ones count from the end, so ``layers=(-2,)`` is FasterVLM's
    single layer -2. Keep 1/3 (192 of 576) by default.

    Example:
        >>> from vtc.plan import ModelInfo
        >>> info = ModelInfo("llava", 576, 32, 24, 22, True)
        >>> VtcCls().compile(info, budget=64).stages[0].scorer.layers
        (16, 17, 18, 19, 20, 21, 22)
        >>> VtcCls(layers=(-2,)).compile(info, budget=64).stages[0].scorer.layers
        (22,)
    """

    name = "vtc_cls"
    summary = "[CLS]-attention top-k of each image's patches before the LLM (VTC-CLS)"

    layers: tuple[int, ...] | None = None
    start: int | None = None
    positions: str = "compact"

    def compile(self, info: ModelInfo, budget=None) -> Plan:
        if not info.has_cls:
            raise MethodNotApplicableError(
                f"vtc_cls ranks patches by the vision tower's [CLS] attention, and this {info.family} "
                f"model's tower has no [CLS] token; use {no_cls_alternatives(info)}"
            )
        f, depth = info.vision_feature_layer, info.vision_layers
        if self.layers is not None and self.start is not None:
            raise VtcError("vtc_cls: give either layers or start, not both")
        if self.layers is not None:
            layers = tuple(x % depth if -depth <= x < 0 else x for x in self.layers)
        else:
            start = default_start(depth, f) if self.start is None else self.start
            start = start % depth if -depth <= start < 0 else start
            layers = tuple(range(start, f + 1))
        bad = [layer for layer in layers if not 0 <= layer < depth]
        if bad or not layers:
            raise VtcError(
                f"vtc_cls layers {list(layers)}: each must be a vision layer in [0, {info.vision_layers - 1}] "
                f"(the feature layer is {f})"
            )
        keep = self.resolve_keep(info, budget)
        stage = Stage("vision", Scorer("cls_attention", layers), keep, positions=self.positions)
        return self._plan(info, (stage,), budget)
