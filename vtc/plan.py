"""A plan: the ordered stages a method compiles to, for one model and one budget.

A stage says *where* tokens are reduced (``vision``: before the LLM, on each image's
features; ``layer:i``: before decoder layer ``i``, at prefill), *how* they are scored and
reduced, and how many visual tokens per image survive it. Adapters execute plans; methods
only produce them, so methods never name a model class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SCORERS = ("cls_attention", "received_attention", "query_attention", "pagerank", "dart", "rater_attention", "random",
           "keys", "mean_keys", "none")
REDUCERS = ("topk", "merge", "pool", "dominant+context", "hired", "tome", "divprune", "vispruner", "cdpruner",
            "downsample", "recycle", "dycoke")
# Reducers of layer stages: top-k, or top-k plus merged tokens recycled from the rest (SparseVLM).
LAYER_REDUCERS = ("topk", "recycle")
POSITIONS = ("keep", "compact")


@dataclass(frozen=True)
class ModelInfo:
    """What a method may know about a model: sizes, never classes.

    Example:
        >>> ModelInfo("llava", image_tokens=576, num_layers=32, vision_layers=24,
        ...           vision_feature_layer=22, has_cls=True).image_tokens
        576
    """

    family: str
    image_tokens: int
    num_layers: int
    vision_layers: int
    vision_feature_layer: int
    has_cls: bool
    hidden_size: int = 0
    intermediate_size: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    # Images are tiled (LLaVA-NeXT, InternVL): ``image_tokens`` is the largest image's count,
    # and an image's tokens are not one square grid.
    tiled: bool = False
    # The adapter knows which part of the image each tile shows (LLaVA-NeXT; HiRED needs it).
    tile_regions: bool = False
    # A tower without [CLS] (Qwen2.5-VL): the vision layer whose attention received per patch (averaged
    # over queries and heads) the adapter can read as a score (``received_attention``), or None.
    received_layer: int | None = None
    # Where ``received_attention`` is read: tower patches behind one LLM token (Qwen's 2x2 merger: 4), and how
    # many patches attend to one another (None: the whole image; a SigLIP tile: its 729). For the FLOPs estimate.
    received_patches: int = 4
    received_span: int | None = None
    # The tower can encode the image at a smaller size, giving fewer tokens itself (``downsample``).
    resizable: bool = False
    # Each image's tokens are one rectangular grid per temporal group, placed by the adapter's layout (``frame``,
    # ``row``, ``col``; Qwen): ``pool`` pools each grid.
    grids: bool = False
    # The family takes video (``pixel_values_videos``), reduced as entries of frames (``dycoke`` needs it).
    video: bool = False


@dataclass(frozen=True)
class Scorer:
    """How tokens are ranked.

    ``cls_attention``: the vision tower's [CLS]-to-patch attention, averaged over the vision
    layers ``layers``. ``query_attention``: attention of the last prompt token at LLM layer
    ``layers[0]``, computed from that layer's input. ``random``: a seeded random ranking.
    ``pagerank``: PageRank over LLM layer ``layers[0]``'s causal attention among all tokens
    (AIM). ``dart``: not a ranking but DART's choice of rows, from LLM layer ``layers[0]``'s keys
    and output (pivots, then the rows least similar to them). ``rater_attention``: SparseVLM's
    relevance, the attention of the image's text raters at LLM layer ``layers[0]``. ``keys``:
    not a ranking but a similarity metric for merging, the attention keys of vision layer
    ``layers[0]`` (``mean_keys``: averaged over heads, as VisionZip merges by).
    ``none``: no signal (pooling, merging by features).

    Example:
        >>> str(Scorer("query_attention", (1,)))
        'query_attention@L1'
    """

    kind: str
    layers: tuple[int, ...] = ()
    seed: int = 0
    options: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in SCORERS:
            raise ValueError(f"unknown scorer {self.kind!r}; known: {', '.join(SCORERS)}")

    def __str__(self) -> str:
        if self.kind in ("cls_attention", "received_attention"):
            return f"{self.kind}@vision{list(self.layers)}"
        if self.kind in ("query_attention", "pagerank", "dart", "rater_attention"):
            return f"{self.kind}@L{self.layers[0]}"
        if self.kind in ("keys", "mean_keys"):
            return f"{self.kind}@vision[{self.layers[0]}]"
        if self.kind == "none":
            return "-"
        return f"random(seed={self.seed})"


@dataclass(frozen=True)
class Stage:
    """One reduction: at ``where``, rank with ``scorer``, keep ``keep`` visual tokens per image.

    ``positions`` says what RoPE positions survivors get: their original ones (``keep``)
    or re-indexed contiguously (``compact``). Vision stages may also merge or pool
    (``reducer``), with ``metric`` the similarity they merge by and ``options`` the
    reducer's settings (``dominant+context``: ``dominant``, the count of dominant tokens;
    ``cls`` 1 to keep the tower's [CLS] token as the first of them; ``pre`` 1 to merge the
    vision tower's features before the projector, which then projects the result; any
    reducer: ``own_count`` 1 when the reducer sizes each image's selection itself (not by ``keep``)
    and may drop the adapter's protected tokens, as HiRED's official mode).

    Example:
        >>> Stage("layer:2", Scorer("query_attention", (1,)), keep=288).layer
        2
    """

    where: str
    scorer: Scorer
    keep: int
    reducer: str = "topk"
    positions: Literal["keep", "compact"] = "keep"
    metric: Scorer | None = None
    options: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.where != "vision" and not (self.where.startswith("layer:") and self.where[6:].isdigit()):
            raise ValueError(f"stage where={self.where!r}: use 'vision' or 'layer:<i>'")
        if self.reducer not in REDUCERS:
            raise ValueError(f"unknown reducer {self.reducer!r}; known: {', '.join(REDUCERS)}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions={self.positions!r}: use one of {POSITIONS}")
        if self.keep < (0 if self.where != "vision" else 1):
            raise ValueError(f"a stage must keep at least one token per image (layer stages may keep 0), "
                             f"got {self.keep}")
        if self.reducer == "recycle" and self.where == "vision":
            raise ValueError("reducer 'recycle' merges pruned tokens inside the LLM: use it at a layer stage")
        if self.reducer not in LAYER_REDUCERS and self.where != "vision":
            raise ValueError(f"reducer {self.reducer!r} runs before the LLM only; layer stages keep top-k "
                             f"(or recycle the rest into merged tokens: 'recycle')")

    @property
    def reducer_label(self) -> str:
        """The reducer with what it merges by, for printing."""
        extra = [str(self.metric)] if self.metric else (["features"] if self.reducer == "merge" else [])
        extra += [f"{k}={v}" for k, v in self.options]
        return f"{self.reducer}({', '.join(extra)})" if extra else self.reducer

    @property
    def layer(self) -> int | None:
        """The decoder layer this stage runs before, or None for a vision stage."""
        return None if self.where == "vision" else int(self.where[6:])


@dataclass(frozen=True)
class Plan:
    """The stages of a method for a model, with the token accounting they imply.

    Example:
        >>> p = Plan("fastv", (Stage("layer:2", Scorer("query_attention", (1,)), 288),),
        ...          image_tokens=576, num_layers=32)
        >>> p.tokens_per_layer()[:3], p.equivalent_tokens
        ([576, 576, 288], 306.0)
    """

    method: str
    stages: tuple[Stage, ...]
    image_tokens: int
    num_layers: int
    params: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        last_layer, kept, seen_layer = -1, self.image_tokens, False
        for s in self.stages:
            if s.reducer in ("tome", "downsample") and s is not self.stages[0]:
                raise ValueError(f"a {s.reducer} stage changes what the vision tower computes: it must be the plan's "
                                 f"first stage")
            if s.layer is None:
                if seen_layer:
                    raise ValueError("vision stages must come before layer stages")
            else:
                seen_layer = True
                if not 0 < s.layer < self.num_layers:
                    raise ValueError(f"stage at layer {s.layer}: use a layer in [1, {self.num_layers - 1}]")
                if s.layer <= last_layer:
                    raise ValueError("layer stages must be at strictly increasing layers")
                last_layer = s.layer
            if s.keep > kept:
                raise ValueError(f"stage {s.where} keeps {s.keep} tokens but only {kept} reach it")
            kept = s.keep

    @property
    def vision_stages(self) -> tuple[Stage, ...]:
        return tuple(s for s in self.stages if s.layer is None)

    @property
    def layer_stages(self) -> tuple[Stage, ...]:
        return tuple(s for s in self.stages if s.layer is not None)

    @property
    def tokens_entering_llm(self) -> int:
        """Visual tokens per image that enter the LLM (after the vision stages)."""
        return self.vision_stages[-1].keep if self.vision_stages else self.image_tokens

    def keeps_for(self, n: int) -> list[int]:
        """Each stage's keep count for an image of ``n`` tokens.

        The plan is made for images of ``image_tokens``; an image of another size (a tiled
        high-resolution image with fewer tiles) keeps the same fraction at every stage.

        Example:
            >>> p = Plan("x", (Stage("layer:2", Scorer("query_attention", (1,)), 288),), 576, 32)
            >>> p.keeps_for(576), p.keeps_for(100)
            ([288], [50])
        """
        if n == self.image_tokens:
            return [s.keep for s in self.stages]
        keeps, last = [], n
        for s in self.stages:
            least = 1 if s.layer is None else 0
            last = min(last, max(least, round(s.keep * n / self.image_tokens)))
            keeps.append(last)
        return keeps

    def tokens_per_layer(self, n: int | None = None, keeps: list[int] | None = None) -> list[int]:
        """Visual tokens per image that each decoder layer processes at prefill, for an image of
        ``n`` tokens (default ``image_tokens``); ``keeps``: what each stage kept of it when it ran
        (a reducer that sizes each image itself, as ``dycoke``, may keep other than :meth:`keeps_for`)."""
        n = self.image_tokens if n is None else n
        keeps = self.keeps_for(n) if keeps is None else keeps
        vision = [k for s, k in zip(self.stages, keeps) if s.layer is None]
        by_layer = {s.layer: k for s, k in zip(self.stages, keeps) if s.layer is not None}
        counts, n = [], vision[-1] if vision else n
        for layer in range(self.num_layers):
            n = by_layer.get(layer, n)
            counts.append(n)
        return counts

    @property
    def equivalent_tokens(self) -> float:
        """The budget this plan meets: visual tokens per image averaged over layers."""
        return sum(self.tokens_per_layer()) / self.num_layers

    def __str__(self) -> str:
        rows = [("stage", "where", "scorer", "reducer", "positions", "tokens kept")]
        rows.append(("0", "input", "-", "-", "-", str(self.image_tokens)))
        for i, s in enumerate(self.stages, 1):
            rows.append((str(i), s.where, str(s.scorer), s.reducer_label, s.positions, str(s.keep)))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = [f"plan {self.method}: {self.image_tokens} visual tokens per image, {self.num_layers} layers"]
        for r in rows:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        lines.append(
            f"entering LLM: {self.tokens_entering_llm} tokens/image; "
            f"equivalent: {self.equivalent_tokens:.1f} tokens/image"
        )
        return "\n".join(lines)
