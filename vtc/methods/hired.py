"""HiRED: share a high-resolution image's token budget between its base image and its tiles."""

from __future__ import annotations

import dataclasses

from vtc.errors import BudgetError, MethodNotApplicableError, VtcError
from vtc.plan import ModelInfo, Plan, Scorer, Stage
from vtc.registry import register_method

from .base import PreLLMTopK, no_cls_alternatives


@register_method
@dataclasses.dataclass
class HiRED(PreLLMTopK):
    """Before the LLM, per image: ``alpha`` of the budget to the base image, its best tokens by
    [CLS] attention at vision layer ``late``; the rest shared among the tiles in proportion to
    how many of the base image's ``int(576 * (1 - alpha))`` best tokens by [CLS] attention at
    layer ``early`` (the official vote) lie in each tile's part of the image, each tile then
    keeping its best tokens at ``late``. Row-end tokens are protected (kept, counted in the
    budget); positions compacted.

    ``regions``: ``"tiles"`` (default) counts a base patch for the tile that shows it;
    ``"official"`` for the tile the official code gives it by reshaping the flat base grid to
    ``(rows, cols, -1)`` (horizontal bands taken as tiles in order). Defaults (the paper's,
    for LLaVA-NeXT with CLIP-L/336): keep 20% of each image's tokens, ``alpha=0.5``,
    ``early=0``, ``late`` the feature layer (22). Needs a model whose adapter knows the
    tiles' regions (LLaVA-NeXT). docs/fidelity.md lists the differences from the official code.

    ``official=True`` selects what the official code selects: the budget (a fraction, the
    official ``token_budget_rate``) counts raw crops, ``int(crops * 576 * rate)`` per image;
    tile shares are truncated; regions are the official bands; row ends are dropped. Each
    image then keeps its own official count; the plan and vtc.stats still count ``rate`` of
    the packed tokens (usually a few more).

    Example:
        >>> from vtc.plan import ModelInfo
        >>> info = ModelInfo("llava_next", 2928, 32, 24, 22, True, tiled=True, tile_regions=True)
        >>> print(HiRED().compile(info).stages[0].reducer_label)
        hired(cls_attention@vision[0], alpha=0.5, vote=1, bands=0)
        >>> print(HiRED(official=True).compile(info, budget=0.2).stages[0].reducer_label)
        hired(cls_attention@vision[0], alpha=0.5, vote=1, bands=1, official=1, rate=0.2, own_count=1)
    """

    name = "hired"
    summary = "high-resolution budget shared between base image and tiles by [CLS] attention (HiRED)"
    default_keep = 0.2

    alpha: float = 0.5
    regions: str | None = None
    early: int = 0
    late: int | None = None
    positions: str = "compact"
    official: bool = False

    def compile(self, info: ModelInfo, budget=None) -> Plan:
        if not info.has_cls:
            raise MethodNotApplicableError(
                f"hired ranks patches by the vision tower's [CLS] attention, and this {info.family} model's tower has "
                f"no [CLS] token; use {no_cls_alternatives(info)}"
            )
        if not info.tile_regions:
            raise MethodNotApplicableError(
                f"hired shares a budget among the tiles of a high-resolution image by the regions they show; "
                f"vtc knows those regions for llava_next only, not {info.family} (use vtc_cls there)"
            )
        regions = self.regions or ("official" if self.official else "tiles")
        if self.official and regions != "official":
            raise VtcError("hired official=True uses the official regions: drop regions='tiles' or official=True")
        if regions not in ("tiles", "official"):
            raise VtcError(f"hired regions={self.regions!r}: use 'tiles' (the tile that shows each base patch) "
                           f"or 'official' (the official code's horizontal bands)")
        if not 0 <= self.alpha <= 1:
            raise VtcError(f"hired alpha={self.alpha}: use a fraction of the budget in [0, 1]")
        late = info.vision_feature_layer if self.late is None else self.late
        bad = [x for x in (self.early, late) if not 0 <= x < info.vision_layers]
        if bad:
            raise VtcError(f"hired early={self.early}, late={late}: use vision layers in [0, {info.vision_layers - 1}]")
        options = (("alpha", self.alpha), ("vote", 1), ("bands", int(regions == "official")))
        if self.official:
            options += (("official", 1), ("rate", self._rate(budget)), ("own_count", 1))
        stage = Stage("vision", Scorer("cls_attention", (late,)), self.resolve_keep(info, budget), reducer="hired",
                      positions=self.positions, metric=Scorer("cls_attention", (self.early,)), options=options)
        return self._plan(info, (stage,), budget)

    def _rate(self, budget) -> float:
        """The official ``token_budget_rate``: the budget (or ``keep``) as a fraction of raw crops."""
        rate = budget if budget is not None else self.keep if self.keep is not None else self.default_keep
        if isinstance(rate, bool) or not isinstance(rate, float) or not 0 < rate <= 1:
            raise BudgetError(f"hired official=True sizes each image's budget as int(crops * 576 * rate): "
                              f"give the budget as a fraction in (0, 1] (the rate, e.g. 0.2), not {rate!r}")
        return rate
