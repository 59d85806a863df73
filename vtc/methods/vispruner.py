"""VisPruner: important tokens by [CLS] attention plus diverse tokens from the rest, before the LLM
(Zhang et al., ICCV 2025)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from vtc.errors import MethodNotApplicableError, VtcError
from vtc.plan import ModelInfo, Plan, Scorer, Stage
from vtc.registry import register_method

from .base import PreLLMTopK


@register_method
@dataclasses.dataclass
class VisPruner(PreLLMTopK):
    """Of ``keep`` tokens per image, ``int(keep * important)`` are the patches with the most [CLS]
    attention at the feature layer (mean over heads); the rest are chosen among the other patches by
    removing duplicates in rounds (:func:`vtc.ops.vispruner_select`: the remaining list, by descending
    attention, split into even and odd positions, and up to 8 of the even ones most cosine-similar to an
    odd one dropped per round). Kept tokens in original order; positions compacted. The attention is
    recomputed from the tower's own projections, so no attention weights are requested from the model.

    Defaults (Theia-4869/VisPruner ``llava/eval/model_vqa_loader.py``): ``important=0.5``. On LLaVA-1.5
    duplicates are judged by the tower's feature-layer outputs before the projector, as the official
    ``encode_images``; tiled families (LLaVA-NeXT, InternVL) have no per-token projector input and use the
    projected features, one selection per image (LLaVA-NeXT row ends kept). Qwen2.5-VL's tower has no
    [CLS] token: important tokens are those receiving the most attention at its last full-attention block
    (as visionzip there). See docs/methods/vispruner.md.

    Example:
        >>> from vtc.plan import ModelInfo
        >>> VisPruner().compile(ModelInfo("llava", 576, 32, 24, 22, True), 64).stages[0].reducer_label
        'vispruner(important=0.5, pre=1)'
    """

    name = "vispruner"
    summary = "VisPruner: important tokens by [CLS] attention plus diverse ones by duplicate removal"

    default_keep: ClassVar[float] = 128 / 576
    important: float = 0.5
    positions: str = "compact"

    def compile(self, info: ModelInfo, budget=None) -> Plan:
        if not info.has_cls and info.received_layer is None:
            raise MethodNotApplicableError(
                f"vispruner ranks important tokens by the vision tower's [CLS] attention, which this {info.family} "
                f"model lacks; use divprune or merge"
            )
        if not 0.0 <= self.important <= 1.0:
            raise VtcError(f"vispruner important={self.important!r}: use the share of kept tokens in [0, 1]")
        f = info.vision_feature_layer
        scorer = Scorer("cls_attention", (f,)) if info.has_cls else Scorer("received_attention", (info.received_layer,))
        # LLaVA-1.5: judge duplicates on the tower's features, then project the kept ones (the projector is per token).
        stage = Stage("vision", scorer, self.resolve_keep(info, budget), reducer="vispruner",
                      positions=self.positions, options=(("important", self.important), ("pre", int(not info.tiled))))
        return self._plan(info, (stage,), budget)
