"""ToMe (Token Merging, Bolya et al., ICLR 2023): bipartite soft matching inside every block of
the vision tower, as the official code (facebookresearch/ToMe) patches a ViT.

In each block, between attention and MLP, ``r`` tokens merge into their most similar partners
(cosine similarity of the attention keys averaged over heads); merged tokens are size-weighted
means, and later blocks' attention adds ``log(size)`` to its logits (proportional attention).
The [CLS] token never merges. The tokens leaving the feature layer go through the projector
to the LLM. The rule and its schedule are here; ``vtc.patches.tome`` runs it in the tower.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from vtc.errors import BudgetError, MethodNotApplicableError, VtcError
from vtc.plan import ModelInfo, Plan, Scorer, Stage
from vtc.registry import register_method

from .base import PreLLMTopK


def official_schedule(r: int | Sequence[int], blocks: int, inflect: float = 0.0) -> list[int]:
    """The tokens each block merges for a user's ``r``, as ToMe's ``parse_r`` reads it
    (tome/utils.py, lines 80-105): an int is a constant ``r`` (``inflect`` tilts it: -1
    decreasing, +1 increasing), a list is per block, padded with zeros.

    Example:
        >>> official_schedule(8, 4), official_schedule(8, 4, inflect=-1), official_schedule([5, 3], 4)
        ([8, 8, 8, 8], [16, 10, 5, 0], [5, 3, 0, 0])
    """
    if not isinstance(r, int):
        r = [int(x) for x in r]
        if len(r) > blocks or any(x < 0 for x in r):
            raise VtcError(f"tome r={r}: give at most {blocks} counts (one per vision block), none negative")
        return r + [0] * (blocks - len(r))
    if r < 0 or not -1 <= inflect <= 1:
        raise VtcError(f"tome r={r}, inflect={inflect}: use r >= 0 and inflect in [-1, 1]")
    low = int(r * (1.0 - inflect))
    step = (2 * r - 2 * low) / max(blocks - 1, 1)
    return [int(low + step * i) for i in range(blocks)]


def remaining(tokens: int, schedule: Sequence[int]) -> int:
    """Mergeable tokens left after the blocks of ``schedule``, each merging at most half of them
    (``bipartite_soft_matching`` caps ``r`` at half the unprotected tokens).

    Example:
        >>> remaining(576, [16] * 23), remaining(16, [8, 8, 8])
        (208, 2)
    """
    for r in schedule:
        tokens -= min(r, tokens // 2)
    return tokens


def budget_schedule(tokens: int, keep: int, blocks: int) -> list[int]:
    """``r`` per block taking ``tokens`` mergeable tokens to ``keep`` in ``blocks`` blocks: as
    even as the counts allow (the extra tokens to the earliest blocks), and never more than a
    block can merge (half its tokens) nor less than the later blocks need to finish.

    Example:
        >>> budget_schedule(16, 6, 3), budget_schedule(576, 64, 23)[:3], sum(budget_schedule(576, 64, 23))
        ([4, 3, 3], [23, 23, 23], 512)
    """
    least = -(-tokens // 2 ** blocks)
    if not least <= keep <= tokens:
        raise BudgetError(
            f"tome merges at most half the tokens in each of the {blocks} vision blocks up to the feature layer, "
            f"so it keeps between {least} and {tokens} tokens per image; use a budget in that range"
        )
    out = []
    for i in range(blocks):
        left = blocks - i
        need = tokens - keep
        # Merge at least what halving in every later block could not finish.
        r = min(tokens // 2, need, max(-(-need // left), tokens - keep * 2 ** (left - 1)))
        out.append(r)
        tokens -= r
    return out


@register_method
@dataclasses.dataclass
class ToMe(PreLLMTopK):
    """ToMe inside the vision tower: in every block up to the feature layer, ``r`` tokens merge
    (bipartite soft matching on the keys averaged over heads, between attention and MLP),
    merged tokens are size-weighted means, attention adds ``log(size)`` to its logits
    (``prop_attn``), [CLS] never merges; the feature layer's tokens, in ToMe's order, go
    through the projector to the LLM. Positions compacted.

    A ``budget`` (or ``keep``) sets ``r`` per block (:func:`budget_schedule`: as constant as the
    counts allow, so the feature layer outputs exactly that many patch tokens); or give the
    official ``r`` (an int for every block, with ``inflect``, or a list per block) and the
    tokens kept follow from it. Default: keep 1/3. LLaVA-1.5-style models only: the tiled
    families pack a fixed grid of tower tokens per tile (use ``merge`` there).

    Example:
        >>> from vtc.plan import ModelInfo
        >>> info = ModelInfo("llava", 576, 32, 24, 22, True)
        >>> ToMe().compile(info, 64).stages[0].keep, ToMe(r=16).compile(info).stages[0].keep
        (64, 208)
    """

    name = "tome"
    summary = "merge r tokens inside every vision block, proportional attention (ToMe, official rule)"

    r: int | list[int] | None = None
    inflect: float = 0.0
    prop_attn: bool = True
    positions: str = "compact"

    def compile(self, info: ModelInfo, budget=None) -> Plan:
        if info.tiled:
            raise MethodNotApplicableError(
                f"tome merges inside the vision tower, and {info.family} arranges each tile's tower tokens in a "
                f"fixed grid (LLaVA-NeXT packs 24x24 per tile, InternVL pixel-shuffles 32x32) that merged tokens "
                f"cannot fill; use merge (bipartite merging after the tower) on this model"
            )
        blocks = info.vision_feature_layer + 1  # the blocks whose merges reach the features
        if self.r is None:
            keep = self.resolve_keep(info, budget)
            schedule = budget_schedule(info.image_tokens, keep, blocks)
        else:
            if budget is not None or self.keep is not None:
                raise BudgetError("tome: give either r (tokens merged per block) or a budget/keep, not both")
            schedule = official_schedule(self.r, info.vision_layers, self.inflect)[:blocks]
            keep = remaining(info.image_tokens, schedule)
        schedule += [0] * (info.vision_layers - len(schedule))
        options = (("r", tuple(schedule)), ("prop_attn", int(bool(self.prop_attn))))
        stage = Stage("vision", Scorer("none"), keep, reducer="tome", positions=self.positions, options=options)
        return self._plan(info, (stage,), budget)
