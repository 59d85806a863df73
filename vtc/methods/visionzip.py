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
    """VisionZip as its official code runs it (``visionzip/clip_encoder.py``). Of ``keep``
    tokens per image, ``dominant`` (default 54/64 of them: the official 54/10, 108/20, 162/30
    splits at 64, 128, 192) are the tower's [CLS] token and the patches with the most [CLS]
    attention at the feature layer; the other patches are merged into ``keep - dominant``
    contextual tokens: every ``R // contextual``-th of the ``R`` left is a target, each other
    patch joins the target whose keys (feature layer, averaged over heads) are most
    cosine-similar, and a contextual token is its target plus the mean of its group. On
    LLaVA-1.5 this runs on the tower's features before the projector, which then projects
    the ``[CLS], dominant (grid order), contextual`` sequence the LLM receives. Positions
    compacted.

    Tiled families (LLaVA-NeXT, InternVL), whose packed or pixel-shuffled features have no
    single [CLS] token and no per-token projector input, merge the projected features by the
    same rule without [CLS] (``dominant`` patches); on LLaVA-NeXT the row ends are kept and
    the tokens stay in grid order. Qwen2.5-VL's tower has no [CLS] token: its dominant tokens are
    the ones receiving the most attention, averaged over queries and heads, at the tower's last
    full-attention block (as VisionZip's and VisPruner's Qwen ports score); see docs/architecture.md.
    See docs/fidelity.md.

    Example:
        >>> from vtc.plan import ModelInfo
        >>> VisionZip().compile(ModelInfo("llava", 576, 32, 24, 22, True), 64).stages[0].options
        (('dominant', 54), ('cls', 1), ('pre', 1))
    """

    name = "visionzip"
    summary = "[CLS] and dominant tokens by [CLS] attention plus merged contextual tokens (VisionZip)"

    dominant: int | float | None = None
    positions: str = "compact"

    def compile(self, info: ModelInfo, budget=None) -> Plan:
        if not info.has_cls and info.received_layer is None:
            raise MethodNotApplicableError(
                f"visionzip needs a vision [CLS] token, which this {info.family} model lacks; use merge"
            )
        keep = self.resolve_keep(info, budget)
        frac = 54 / 64 if self.dominant is None else self.dominant
        dominant = round(frac * keep) if isinstance(frac, float) else int(frac)
        if not 1 <= dominant <= keep:
            raise VtcError(f"visionzip dominant={self.dominant!r}: use a count in [1, {keep}] or a fraction")
        official = not info.tiled  # [CLS] kept and merging before the projector
        f = info.vision_feature_layer
        # Without [CLS] (Qwen2.5-VL): dominant by the attention each patch receives, averaged over queries.
        scorer = Scorer("cls_attention", (f,)) if info.has_cls else Scorer("received_attention", (info.received_layer,))
        stage = Stage("vision", scorer, keep, reducer="dominant+context",
                      positions=self.positions, metric=Scorer("mean_keys", (f,)),
                      options=(("dominant", dominant), ("cls", int(official)), ("pre", int(official))))
        return self._plan(info, (stage,), budget)
