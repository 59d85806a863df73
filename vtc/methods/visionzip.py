"""VisionZip: dominant tokens by [CLS] attention, the rest merged into a few contextual tokens."""

from __future__ import annotations

import dataclasses

from vtc.errors import MethodNotApplicableError, VtcError
from vtc.plan import ModelInfo, Plan, Scorer, Stage
from vtc.registry import register_method

from .base import PreLLMTopK


@register_method
@dataclasses.dataclass
class VisionZip(PreLLMTopK):
    """Of ``keep`` tokens per image, ``dominant`` (default 54/64 of them, the paper's split)
    are the patches with the most [CLS] attention at the feature layer; the rest of the
    patches are grouped by key similarity around evenly spaced targets and averaged into
    ``keep - dominant`` contextual tokens. Positions compacted.

    Example:
        >>> from vtc.plan import ModelInfo
        >>> VisionZip().compile(ModelInfo("llava", 576, 32, 24, 22, True), 64).stages[0].options
        (('dominant', 54),)
    """

    name = "visionzip"
    summary = "dominant tokens by [CLS] attention plus merged contextual tokens (VisionZip)"

    dominant: int | float | None = None
    positions: str = "compact"

    def compile(self, info: ModelInfo, budget=None) -> Plan:
        if not info.has_cls:
            raise MethodNotApplicableError(
                f"visionzip needs a vision [CLS] token, which this {info.family} model lacks; use tome"
            )
        keep = self.resolve_keep(info, budget)
        frac = 54 / 64 if self.dominant is None else self.dominant
        dominant = round(frac * keep) if isinstance(frac, float) else int(frac)
        if not 1 <= dominant <= keep:
            raise VtcError(f"visionzip dominant={self.dominant!r}: use a count in [1, {keep}] or a fraction")
        f = info.vision_feature_layer
        stage = Stage("vision", Scorer("cls_attention", (f,)), keep, reducer="dominant+context",
                      positions=self.positions, metric=Scorer("keys", (f,)), options=(("dominant", dominant),))
        return self._plan(info, (stage,), budget)
