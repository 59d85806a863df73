"""Merging before the LLM: ToMe's bipartite matching applied to each image's tower output until
the budget remains (not ToMe itself, which merges inside every ViT block: see ``tome``)."""

from __future__ import annotations

import dataclasses

from vtc.errors import VtcError
from vtc.plan import ModelInfo, Plan, Scorer, Stage
from vtc.registry import register_method

from .base import PreLLMTopK


@register_method
@dataclasses.dataclass
class Merge(PreLLMTopK):
    """Bipartite soft matching (ToMe's rule, Bolya et al., ICLR 2023) on the cosine similarity of
    a vision layer's attention keys (heads concatenated), applied to the projected features once
    the tower has run, repeated (at most half the tokens per round) until ``keep`` tokens remain;
    merged features are size-weighted means, in original order; positions compacted. Unlike
    ``tome`` it leaves the tower alone, so it runs on every family (tiled images too).

    Defaults: keys of the feature layer, keep 1/3.

    Example:
        >>> from vtc.plan import ModelInfo
        >>> Merge().compile(ModelInfo("llava", 576, 32, 24, 22, True), 64).stages[0].metric.layers
        (22,)
    """

    name = "merge"
    summary = "merge similar tokens after the vision tower (ToMe's bipartite matching, repeated) before the LLM"

    layer: int | None = None
    positions: str = "compact"

    def compile(self, info: ModelInfo, budget=None) -> Plan:
        layer = info.vision_feature_layer if self.layer is None else self.layer
        if not 0 <= layer < info.vision_layers:
            raise VtcError(f"merge layer={layer}: use a vision layer in [0, {info.vision_layers - 1}]")
        stage = Stage("vision", Scorer("none"), self.resolve_keep(info, budget), reducer="merge",
                      positions=self.positions, metric=Scorer("keys", (layer,)))
        return self._plan(info, (stage,), budget)
