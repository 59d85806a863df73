"""SparseVLM: text-guided pruning of image tokens inside the LLM (Zhang et al., ICML 2025)."""

from __future__ import annotations

import dataclasses

from vtc.budget import resolve_count
from vtc.errors import BudgetError, VtcError
from vtc.ops import recycled
from vtc.plan import ModelInfo, Plan, Scorer, Stage
from vtc.registry import register_method

from .base import Method

# The official per-layer counts (``llava/model/language_model/score.py``), by ``RETAIN_TOKN``: image tokens
# kept after decoder layers 2, 6 and 15 of LLaVA-1.5-7B's 32, of 576.
OFFICIAL_COUNTS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
OFFICIAL_LAYERS = (2, 6, 15)
# Recycling (modelling_sparse_llama.py L280-290): the top 30% (+1) of the pruned tokens by relevance, one
# merged token per 10 of them (+1).
RECYCLE = (("share", 0.3), ("per_cluster", 10))


def with_recycled(n: int, counts: list[int]) -> list[int]:
    """Image tokens after each stage when each keeps ``counts[i]`` of those reaching it (at most all but
    one, as ``min(count, v - 1)``) and adds the merged tokens recycled from the rest.

    Example:
        >>> with_recycled(576, [300, 200, 110]), with_recycled(576, [303, 110, 36])
        ([309, 204, 113], [312, 117, 39])
    """
    out, reaching = [], n
    for c in counts:
        k = min(c, reaching - 1) if reaching > 1 else reaching
        reaching = k + recycled(reaching - k)[1]
        out.append(reaching)
    return out


def scaled_layers(num_layers: int) -> tuple[int, ...]:
    """The official pruning layers 2, 6, 15 of 32 on a model of ``num_layers`` (each the layer whose
    attention scores; tokens go from the next layer on), kept strictly increasing and below the last.

    Example:
        >>> scaled_layers(32), scaled_layers(8), scaled_layers(4)
        ((2, 6, 15), (0, 2, 4), (0, 1, 2))
    """
    out: list[int] = []
    for x in OFFICIAL_LAYERS:
        layer = max(round(x * num_layers / 32), out[-1] + 1 if out else 0)
        if layer < num_layers - 1:
            out.append(layer)
    return tuple(out)


@register_method
@dataclasses.dataclass
class SparseVLM(Method):
    """Text raters (the text tokens after the image that its tokens' input embeddings point to most,
    :func:`vtc.ops.select_raters`) rate the image tokens by their attention at each of ``layers``
    (:func:`vtc.ops.queries_attention`, averaged over heads and raters); after each such layer the
    ``counts[i]`` best image tokens are kept and re-indexed contiguously; with ``recycle`` (the official
    default) the most relevant 30% of the pruned ones are clustered (:func:`vtc.ops.dpc_merge`) into
    one merged token per 10, placed after the kept image tokens.

    Defaults (the official ``RETAIN_TOKN=192``): layers 2, 6, 15 of 32, counts 300, 200, 110 of 576
    (309, 204, 113 tokens with the merged ones); ``retain`` picks another official row (192, 128, 96,
    64). A ``budget`` (equivalent tokens, merged tokens counted) scales the counts of the official row
    nearest to it until the plan meets it exactly. Stage counts (``vtc.plan``) include merged tokens.

    Example:
        >>> from vtc.plan import ModelInfo
        >>> plan = SparseVLM().compile(ModelInfo("llava", 576, 32, 24, 22, True))
        >>> [s.where for s in plan.stages], [s.keep for s in plan.stages]
        (['layer:3', 'layer:7', 'layer:16'], [309, 204, 113])
    """

    name = "sparsevlm"
    summary = "SparseVLM: text raters' attention prunes image tokens at three LLM layers"

    layers: tuple[int, ...] | None = None
    counts: tuple[int, ...] | None = None
    retain: int | None = None
    recycle: bool = True
    positions: str = "compact"

    def _layers(self, info: ModelInfo) -> tuple[int, ...]:
        num = info.num_layers
        layers = tuple(self.layers) if self.layers is not None else scaled_layers(num)
        if not layers or list(layers) != sorted(set(layers)) or not all(0 <= x < num - 1 for x in layers):
            raise VtcError(f"sparsevlm layers {list(layers)}: use strictly increasing layers in [0, {num - 2}] "
                           f"(tokens are pruned after each)")
        return layers

    def compile(self, info: ModelInfo, budget=None) -> Plan:
        n, layers = info.image_tokens, self._layers(info)
        given = [k for k, v in (("budget", budget), ("counts", self.counts), ("retain", self.retain)) if v is not None]
        if len(given) > 1:
            raise BudgetError(f"sparsevlm: give one of budget, counts and retain, not {' and '.join(given)}")
        if self.retain is not None and self.retain not in OFFICIAL_COUNTS:
            raise VtcError(f"sparsevlm retain={self.retain}: the official rows are {sorted(OFFICIAL_COUNTS)}; "
                           f"for another count pass budget= or counts=")
        if self.counts is not None:
            counts = [int(c) for c in self.counts]
            if len(counts) != len(layers) or any(c < 1 for c in counts):
                raise VtcError(f"sparsevlm counts {counts}: give one positive count per layer {list(layers)}")
            counts = with_recycled(n, counts) if self.recycle else counts
        elif budget is not None:
            counts = self._solve(info, layers, resolve_count(budget, n), budget, self.recycle)
        else:
            official = OFFICIAL_COUNTS[self.retain or 192]
            counts = [max(1, round(c * n / 576)) for c in official[: len(layers)]]
            counts = with_recycled(n, counts) if self.recycle else counts
        kept, stages = n, []
        reducer, options = ("recycle", RECYCLE) if self.recycle else ("topk", ())
        for layer, count in zip(layers, counts):
            kept = min(kept, count)
            stages.append(Stage(f"layer:{layer + 1}", Scorer("rater_attention", (layer,)), kept, reducer=reducer,
                                positions=self.positions, options=options))
        return self._plan(info, tuple(stages), budget)

    @staticmethod
    def _solve(info: ModelInfo, layers, target: float, budget, recycle: bool) -> list[int]:
        n, num = info.image_tokens, info.num_layers
        label = min(OFFICIAL_COUNTS, key=lambda b: abs(b - target * 576 / n))
        profile = [c * n / 576 for c in OFFICIAL_COUNTS[label][: len(layers)]]

        def counts(scale: float) -> list[int]:
            out, last = [], n
            for c in profile:
                last = min(last, max(1, round(c * scale)))
                out.append(last)
            if recycle and out[0] < n:
                return with_recycled(n, out)
            return out

        def equivalent(cs: list[int]) -> float:
            bounds = [0, *(x + 1 for x in layers), num]
            return sum(h * (b1 - b0) for h, b0, b1 in zip([n, *cs], bounds[:-1], bounds[1:])) / num

        lowest = equivalent([1] * len(layers))
        if target < lowest:
            raise BudgetError(
                f"sparsevlm prunes after layers {list(layers)}, so it keeps all {n} tokens in the first "
                f"{layers[0] + 1} layers and cannot reach budget {budget!r}: the lowest feasible budget is "
                f"{lowest:.1f} tokens; raise it or prune earlier (`layers`)")
        lo, hi = 0.0, n / min(profile)
        for _ in range(60):  # the equivalent tokens grow with the scale: bisect
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if equivalent(counts(mid)) < target else (lo, mid)
        return counts(hi)
