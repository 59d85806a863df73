"""ToMe before the LLM: merge each image's most similar tokens until the budget remains."""

from __future__ import annotations

import dataclasses

from vtc.errors import VtcError
from vtc.plan import ModelInfo, Plan, Scorer, Stage
from vtc.registry import register_method

from .base import PreLLMTopK


@register_method
@dataclasses.dataclass
class ToMe(PreLLMTopK):
    """Bipartite soft matching (Bolya et al., ICLR 2023) on the cosine similarity of a vision
    layer's attention keys, repeated (at most half the tokens per round) until ``keep`` tokens
    remain; merged features are size-weighted means; positions compacted.

    Defaults: keys of the feature layer, keep 1/3.

    Example:
        >>> from vtc.plan import ModelInfo
        >>> ToMe().compile(ModelInfo("llava", 576, 32, 24, 22, True), 64).stages[0].metric.layers
        (22,)
    """

    name = "tome"
    summary = "merge similar tokens (bipartite soft matching on vision keys) before the LLM (ToMe)"

    layer: int | None = None
    positions: str = "compact"

    def compile(self, info: ModelInfo, budget=None) -> Plan:
        layer = info.vision_feature_layer if self.layer is None else self.layer
        if not 0 <= layer < info.vision_layers:
            raise VtcError(f"tome layer={layer}: use a vision layer in [0, {info.vision_layers - 1}]")
        stage = Stage("vision", Scorer("none"), self.resolve_keep(info, budget), reducer="merge",
                      positions=self.positions, metric=Scorer("keys", (layer,)))
        return self._plan(info, (stage,), budget)
