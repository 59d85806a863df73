"""Downsample: the image resized so that the vision tower itself produces the budget's tokens
(the baseline of VTC-Bench, Liao et al., 2025)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from vtc.errors import MethodNotApplicableError
from vtc.plan import ModelInfo, Plan, Scorer, Stage
from vtc.registry import register_method

from .base import PreLLMTopK


@register_method
@dataclasses.dataclass
class Downsample(PreLLMTopK):
    """Resize each image so that the vision tower gives at most ``keep`` tokens, keeping its aspect as
    near as whole tokens allow (:func:`vtc.ops.downsampled_grid`: 64 of 576 -> 8x8, 128 -> 11x11 = 121,
    192 -> 13x14 = 182); nothing is selected after the tower. Positions compacted (the prompt reads like
    one of a smaller image).

    VTC-Bench (Chenfei-Liao/VTC-Bench ``qwen2_vl.py``) resizes the image (bicubic, width and height
    divided by the same factor) before Qwen2-VL's processor, whose tower takes any size. Here:
    Qwen2.5-VL rebuilds each image from its patches, resizes it and cuts it into patches again;
    LLaVA-1.5's tower has one fixed size, so the processed image is resized and the tower interpolates
    its position embeddings (``interpolate_pos_encoding``). LLaVA-NeXT and InternVL cut images into
    fixed-size tiles their processors choose, and are refused (give the processor fewer tiles).
    See docs/methods/downsample.md.

    Example:
        >>> from vtc.plan import ModelInfo
        >>> Downsample().compile(ModelInfo("llava", 576, 32, 24, 22, True, resizable=True), 64).stages[0].reducer
        'downsample'
    """

    name = "downsample"
    summary = "image resized so that the vision tower itself gives the budget's tokens (VTC-Bench's baseline)"

    default_keep: ClassVar[float] = 1 / 9
    positions: str = "compact"

    def compile(self, info: ModelInfo, budget=None) -> Plan:
        if not info.resizable:
            raise MethodNotApplicableError(
                f"downsample resizes an image so that the vision tower gives fewer tokens, and this {info.family} "
                f"model's tower cannot (fixed-size tiles its processor chooses, or the [CLS] token among the "
                f"features): give the processor a smaller image or fewer tiles, or use a method that reduces "
                f"after the tower (pool, merge, divprune)"
            )
        stage = Stage("vision", Scorer("none"), self.resolve_keep(info, budget), reducer="downsample",
                      positions=self.positions)
        return self._plan(info, (stage,), budget)
