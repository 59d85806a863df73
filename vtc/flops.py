"""Analytic prefill FLOPs of the language model, and the stats of the last prefill.

Per decoder layer on ``n`` tokens (hidden ``d``, ``h`` query heads and ``g`` kv heads of
size ``c``, MLP width ``m``), counting a multiply-add as 2 FLOPs:

* projections: ``2 n d (h c) * 2`` (q and o) ``+ 2 n d (g c) * 2`` (k and v)
* attention:  ``4 n^2 h c`` (scores and weighted values, the full square a dense kernel computes)
* gated MLP:  ``6 n d m``

Scoring adds, per ``query_attention`` stage, one key projection and one query row
(``2 n d g c + 2 d h c + 2 n h c``); per ``pagerank`` stage, the q and k projections of every
token, one causal ``q k^T`` and five passes of ``s M`` over the lower triangle
(``2 n d (h + g) c + n^2 h c + 5 n^2 h``). Per ``dart`` stage (scored at the layer before, from
its own keys): RoPE and L1 norms of the keys, the final norm of the layer's output, and each
pivot's cosine similarity to the image rows (``4 n g c + 4 n d + 2 P N d``). Per
``rater_attention`` stage (SparseVLM) the raters' rows of the scoring layer's attention, at most
``2 t n h c`` for ``t`` text tokens. A stage scored at an earlier layer reuses that layer's own
projections and pays no projection terms (``2 n h c``; ``n^2 h c + 5 n^2 h``). Per vision layer of
a ``cls_attention`` scorer one key projection of the tower (``2 N D^2``). Merging and pooling
before the LLM are not counted (``O(N^2 C)`` similarity at most, small next to the LLM).
The vision tower and the LM head are the same with and without a method and are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .plan import ModelInfo, Plan


def layer_flops(info: ModelInfo, n: int) -> float:
    """FLOPs of one decoder layer on ``n`` tokens.

    Example:
        >>> info = ModelInfo("x", 576, 32, 24, 22, True, hidden_size=4096, intermediate_size=11008,
        ...                  num_heads=32, num_kv_heads=32, head_dim=128)
        >>> round(layer_flops(info, 640) / 1e9, 1)
        265.8
    """
    d, m = info.hidden_size, info.intermediate_size
    hc, gc = info.num_heads * info.head_dim, info.num_kv_heads * info.head_dim
    return 4 * n * d * hc + 4 * n * d * gc + 4 * n * n * hc + 6 * n * d * m


def _image_sizes(plan_or_info, images: int | list[int]) -> list[int]:
    """``images``: a number of images of the nominal size, or each image's token count."""
    return [plan_or_info.image_tokens] * images if isinstance(images, int) else list(images)


def visual_per_layer(plan: Plan, images: int | list[int], keeps: list[list[int]] | None = None) -> list[int]:
    """Visual tokens of all images together at each layer (``keeps``: each image's counts per stage as run,
    instead of the plan's)."""
    sizes = _image_sizes(plan, images)
    per_image = [plan.tokens_per_layer(n, None if keeps is None else keeps[i]) for i, n in enumerate(sizes)]
    return [sum(c) for c in zip(*per_image)] if per_image else [0] * plan.num_layers


def scoring_flops(info: ModelInfo, plan: Plan, text: int, images: int | list[int], vision_hidden: int = 0,
                  keeps: list[list[int]] | None = None) -> float:
    """FLOPs the plan's scorers add to a prefill of ``text`` + visual tokens (``images``: a count
    of images of the plan's size, or each image's token count)."""
    total, visual = 0.0, visual_per_layer(plan, images, keeps)
    sizes = _image_sizes(plan, images)
    hc, gc, d = info.num_heads * info.head_dim, info.num_kv_heads * info.head_dim, info.hidden_size
    for s in plan.stages:
        # Scored at an earlier layer: the projections are that layer's own (patches/decoder.py).
        projected = s.layer is None or s.scorer.layers[0] >= s.layer
        if s.scorer.kind == "query_attention":
            n = text + visual[s.scorer.layers[0]]
            total += 2 * n * hc + (2 * n * d * gc + 2 * d * hc if projected else 0)
        elif s.scorer.kind == "pagerank":
            n = text + visual[s.scorer.layers[0]]
            # One causal q k^T and 5 passes of s M, both over the lower triangle; maybe q and k of every token.
            total += n * n * hc + 5 * n * n * info.num_heads + (2 * n * d * (hc + gc) if projected else 0)
        elif s.scorer.kind == "dart":
            # The scoring layer's own keys (RoPE only), the final norm of its output, and each pivot's cosine
            # similarity to the image rows: small next to a layer.
            n = text + visual[s.scorer.layers[0]]
            pivots = sum(v for k, v in s.scorer.options)
            total += 4 * n * gc + 4 * n * d + 2 * pivots * visual[s.scorer.layers[0]] * d
        elif s.scorer.kind == "rater_attention":
            # The raters' query rows (at most the text) against every key, from the scoring layer's own projections.
            total += 2 * text * (text + visual[s.scorer.layers[0]]) * hc
        elif s.scorer.kind == "cls_attention":
            total += len(s.scorer.layers) * sum(2 * (n + 1) * vision_hidden**2 for n in sizes)
        elif s.scorer.kind == "received_attention":
            # q and k of every patch (``received_patches`` per token), and q k^T within each attention span
            # (the whole image behind Qwen's merger; each tile of a SigLIP tower).
            for n in sizes:
                patches = info.received_patches * n
                span = min(patches, info.received_span or patches)
                total += len(s.scorer.layers) * (4 * patches * vision_hidden**2 + 2 * patches * span * vision_hidden)
    return total


def prefill_flops(info: ModelInfo, plan: Plan | None, text: int, images: int | list[int],
                  vision_hidden: int = 0, keeps: list[list[int]] | None = None) -> float:
    """Analytic prefill FLOPs of the LLM for one sequence with ``text`` tokens and ``images``
    images (a count of images of the model's nominal size, or each image's token count;
    ``keeps``: each image's counts per stage as run, where they differ from the plan's).

    With ``plan=None``: the unreduced model.

    Example:
        >>> info = ModelInfo("x", 576, 2, 24, 22, True, hidden_size=8, intermediate_size=16,
        ...                  num_heads=2, num_kv_heads=2, head_dim=4)
        >>> prefill_flops(info, None, text=10, images=1) == 2 * layer_flops(info, 586)
        True
    """
    if plan is None:
        return info.num_layers * layer_flops(info, text + sum(_image_sizes(info, images)))
    layers = sum(layer_flops(info, text + n) for n in visual_per_layer(plan, images, keeps))
    return layers + (scoring_flops(info, plan, text, images, vision_hidden, keeps) if images else 0.0)


@dataclass
class Stats:
    """What the last prefill did, per sequence of the batch.

    Example:
        >>> Stats("fastv", images=1, text_tokens=64, image_tokens=576, tokens_entering_llm=576,
        ...       tokens_per_layer=[576, 288], flops=1.0, flops_full=2.0).flops_ratio
        0.5
    """

    method: str
    images: int
    text_tokens: int
    image_tokens: float
    tokens_entering_llm: float
    tokens_per_layer: list[float]
    flops: float
    flops_full: float
    kept: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def equivalent_tokens(self) -> float:
        """Visual tokens per image averaged over the LLM's layers."""
        return sum(self.tokens_per_layer) / len(self.tokens_per_layer)

    @property
    def flops_ratio(self) -> float:
        """Prefill FLOPs with the method over FLOPs without it."""
        return self.flops / self.flops_full if self.flops_full else 1.0

    def __str__(self) -> str:
        return (
            f"{self.method}: {self.images} image(s), {self.text_tokens} text tokens; visual tokens/image "
            f"{self.image_tokens:g} -> {self.tokens_entering_llm:g} entering the LLM, "
            f"{self.equivalent_tokens:.1f} equivalent; prefill {self.flops / 1e9:.3g} GFLOPs "
            f"({self.flops_ratio:.1%} of {self.flops_full / 1e9:.3g})"
        )


def make_stats(info: ModelInfo, plan: Plan, text: int, images: int | list[int], kept=None,
               vision_hidden: int = 0, keeps: list[list[int]] | None = None) -> Stats:
    """The :class:`Stats` of a prefill with ``text`` tokens and ``images`` images under ``plan``
    (a count of images of the nominal size, or each image's token count; ``keeps``: what each
    stage kept of each image as it ran). Token counts are per image: averages when images differ."""
    sizes = _image_sizes(info, images)
    count = len(sizes)
    if count == 0:
        per_layer, entering, size = [0] * info.num_layers, 0, info.image_tokens
    else:
        per_layer = [v / count for v in visual_per_layer(plan, sizes, keeps)]
        entering, size = per_layer[0], sum(sizes) / count
        if all(n == sizes[0] for n in sizes):
            per_layer, entering, size = [round(v) for v in per_layer], round(entering), sizes[0]
    return Stats(
        plan.method,
        count,
        text,
        size,
        entering,
        per_layer,
        prefill_flops(info, plan, text, sizes, vision_hidden, keeps),
        prefill_flops(info, None, text, sizes),
        kept if kept is not None else {},  # layer stages fill it in as the prefill runs
    )
