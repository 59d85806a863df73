"""How a vision stage turns per-image tokens and signals into fewer tokens.

Pure dispatch from a :class:`~vtc.plan.Stage`'s reducer to the operators in
:mod:`vtc.ops`; adapters call it with the signals they captured.
"""

from __future__ import annotations

import dataclasses

import torch

from . import ops
from .errors import BudgetError, MethodNotApplicableError
from .plan import Stage


def reduce_vision(
    stage: Stage, feats: torch.Tensor, scores: torch.Tensor | None, metric: torch.Tensor | None,
    protected: torch.Tensor | None = None, layout: dict[str, torch.Tensor] | None = None,
    cls: torch.Tensor | None = None, text: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``stage`` to ``feats`` ``[I, n, D]``; returns the reduced features and, for each,
    its position among the ``n`` inputs (``[I, k]``; ascending, except ``dominant+context``,
    whose tokens come in VisionZip's order: see :func:`vtc.ops.dominant_and_context`, and ``dycoke`` under
    compact positions, in DyCoke's: see :func:`vtc.ops.temporal_prune`).

    ``protected`` (bool ``[n]``, fewer than ``stage.keep`` set) marks tokens kept as they are
    (LLaVA-NeXT's row ends); the stage reduces the others to the rest of the budget.
    ``layout`` (``{name: [I, n]}``): where each token is in a tiled image, for ``hired``.
    ``cls`` (``[I, D]``): the images' [CLS] tokens, which ``dominant+context`` keeps first when
    its option ``cls`` is 1.
    ``text`` (one ``[M_i, D]`` per image): the embeddings of the instruction each image is asked about,
    which ``cdpruner`` weighs tokens by.

    Example:
        >>> from vtc.plan import Scorer, Stage
        >>> f = torch.randn(2, 16, 8)
        >>> reduce_vision(Stage("vision", Scorer("none"), 4, reducer="pool"), f, None, None)[1]
        tensor([[ 5,  7, 13, 15],
                [ 5,  7, 13, 15]])
    """
    if protected is not None and bool(protected.any()):
        fixed, free = protected.nonzero()[:, 0], (~protected).nonzero()[:, 0]
        inner = resized(stage, stage.keep - fixed.numel())
        scores, metric = (None if t is None else t[:, free] for t in (scores, metric))
        layout = None if layout is None else {k: v[:, free] for k, v in layout.items()}
        reduced, local = reduce_vision(inner, feats[:, free], scores, metric, layout=layout, cls=cls, text=text)
        index = torch.cat([fixed.expand(feats.shape[0], -1), free[local]], dim=1)
        index, order = index.sort(dim=1)
        both = torch.cat([feats[:, fixed], reduced], dim=1)
        return ops.gather_tokens(both, order), index
    if stage.reducer == "hired" and dict(stage.options).get("official"):
        return _hired_official(stage, feats, scores, metric, layout)
    if stage.reducer == "hired":
        options = dict(stage.options)
        alpha = options.get("alpha", 0.5)
        # Regions: the tile each base patch is shown by, or (regions=1) the official horizontal bands.
        region = layout["band" if options.get("bands") else "region"]
        keep = []
        for i in range(feats.shape[0]):
            base = int((layout["tile"][i] == 0).sum())
            vote = int(base * (1 - alpha)) if options.get("vote") else None  # official: int(576 * (1 - alpha))
            keep.append(ops.hired_select(scores[i], metric[i], layout["tile"][i], region[i], stage.keep, alpha, vote))
        keep = torch.stack(keep)
        return ops.gather_tokens(feats, keep), keep
    if stage.reducer == "topk":
        keep = ops.topk_keep(scores, stage.keep)
        return ops.gather_tokens(feats, keep), keep
    if stage.reducer == "dycoke":
        return _dycoke(stage, feats, layout)
    if stage.reducer == "divprune":
        keep = ops.divprune_select(feats, stage.keep)
        return ops.gather_tokens(feats, keep), keep
    if stage.reducer == "vispruner":
        # metric: the features duplicates are judged by (the tower's, before the projector), else feats.
        important = int(stage.keep * dict(stage.options)["important"])  # the official int(T * r)
        keep = ops.vispruner_select(scores, feats if metric is None else metric, stage.keep, important)
        return ops.gather_tokens(feats, keep), keep
    if stage.reducer == "cdpruner":
        if text is None:
            raise ValueError("a cdpruner stage weighs tokens by the instruction: pass text")
        negative = bool(dict(stage.options).get("negative"))
        relevance = torch.stack([ops.instruction_relevance(f, t, negative) for f, t in zip(feats, text)])
        keep = ops.dpp_select(feats, relevance, stage.keep)
        return ops.gather_tokens(feats, keep), keep
    if stage.reducer == "pool":
        if layout is not None and "frame" in layout:  # grids per temporal group (Qwen) or frame (OneVision)
            return _pool_grids(feats, stage.keep, layout)
        return ops.pool_grid(feats, stage.keep)
    if stage.reducer == "merge":
        return ops.merge_to(feats, metric if metric is not None else feats, stage.keep)
    if stage.reducer == "dominant+context":
        options = dict(stage.options)
        dominant = options["dominant"]
        if options.get("cls") and cls is None:
            raise ValueError("this dominant+context stage keeps the [CLS] token: pass cls")
        return ops.dominant_and_context(feats, scores, metric if metric is not None else feats, dominant,
                                        stage.keep - dominant, cls if options.get("cls") else None)
    raise ValueError(f"unknown reducer {stage.reducer!r}")


def _pool_grids(feats: torch.Tensor, keep: int, layout: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`vtc.ops.pool_frames` over the tokens that form grids (layout ``frame`` >= 0); tokens with ``frame``
    -1 (LLaVA-OneVision's row ends, a video's newline) are kept as they are, within ``keep``; ``frame`` -2 marks
    tokens of no single grid (LLaVA-OneVision's anyres images), which pool refuses."""
    frame = layout["frame"]
    if bool((frame < -1).any()):
        raise MethodNotApplicableError(
            "pool averages token grids, and this image's tokens are not one (tiles packed at another resolution "
            "than the base image's, as LLaVA-OneVision's anyres images): use random or merge for such images"
        )
    grid = frame[0] >= 0
    if bool(grid.all()):
        return ops.pool_frames(feats, keep, frame, layout["row"], layout["col"])
    fixed, free = (~grid).nonzero()[:, 0], grid.nonzero()[:, 0]
    pooled, local = ops.pool_frames(feats[:, free], keep - fixed.numel(),
                                    *(layout[k][:, free] for k in ("frame", "row", "col")))
    index, order = torch.cat([fixed.expand(feats.shape[0], -1), free[local]], dim=1).sort(dim=1)
    return ops.gather_tokens(torch.cat([feats[:, fixed], pooled], dim=1), order), index


def _dycoke(stage: Stage, feats: torch.Tensor, layout: dict[str, torch.Tensor] | None):
    """DyCoke's TTM (:func:`vtc.ops.temporal_prune`) on each entry whose layout has two frames or more (a video);
    an image (one grid, or no grid: an anyres image) passes unchanged. Tokens outside the frames (a OneVision
    video's newline, ``frame`` -1) stay after them. Each pruned frame keeps ``int(ratio * N)`` tokens (option
    ``ratio``, the official count), else the most that keep the entry within ``stage.keep``. Kept tokens come in
    DyCoke's order under compact positions; under kept positions in their original order, so each token keeps
    its own position."""
    count, n, _ = feats.shape
    frame = None if layout is None or "frame" not in layout else layout["frame"]
    if frame is None or int(frame.max()) < 1:  # no video among these entries
        return feats, torch.arange(n, device=feats.device).expand(count, -1)
    if not torch.equal(frame, frame[:1].expand_as(frame)):
        raise ValueError("dycoke reduces entries of one layout together: give it one video per call")
    frame = frame[0]
    grid = frame >= 0
    frames = int(frame.max()) + 1
    per = int(grid.sum()) // frames
    if not torch.equal(frame[: frames * per], torch.arange(frames, device=frame.device).repeat_interleave(per)) \
            or bool(grid[frames * per:].any()):
        raise ValueError("dycoke needs each video's whole frames in order: make it the first vision stage")
    fixed = (~grid).nonzero()[:, 0]
    options = dict(stage.options)
    if "ratio" in options:
        cut = int(options["ratio"] * per)  # the official int(merging_ratio * num_tokens_per_frame)
    else:
        whole, pruned = ops.temporal_prune_counts(frames)
        lowest, highest = whole * per + fixed.numel(), (whole + pruned) * per + fixed.numel()
        if stage.keep < lowest:
            raise BudgetError(
                f"dycoke keeps {whole} of this video's {frames} frames whole ({per} tokens each), so it keeps at least "
                f"{lowest} of its {n} tokens ({lowest / n:.3f}); the budget allows {stage.keep}: feasible for this "
                f"video: {lowest} to {highest} tokens ({lowest / n:.3f} to {highest / n:.3f} of it); raise the budget"
            )
        cut = min(per, (stage.keep - lowest) // pruned)
    local = torch.cat([ops.temporal_prune(feats[i, : frames * per].view(frames, per, -1), cut)
                       for i in range(count)]).view(count, -1)
    index = torch.cat([local, fixed.expand(count, -1)], dim=1)
    if stage.positions == "keep":
        index = index.sort(dim=1).values
    return ops.gather_tokens(feats, index), index


# Reducers whose output is their input gathered at the indices they return (nothing is mixed).
SELECTIONS = frozenset({"topk", "divprune", "hired", "vispruner", "cdpruner", "dycoke"})


def reduce_companions(
    stage: Stage, companions: torch.Tensor, local: torch.Tensor, feats: torch.Tensor, scores: torch.Tensor | None,
    metric: torch.Tensor | None, protected: torch.Tensor | None = None, layout: dict | None = None,
) -> torch.Tensor:
    """Per-token tensors ``companions`` ``[I, n, C]`` that ride along with ``feats`` (Qwen3-VL's DeepStack
    features), reduced exactly as :func:`reduce_vision` reduced ``feats`` to the tokens at ``local``: gathered
    after a selection; after a merge or pool, merged by the same rule on the same signals, with ``feats`` as
    the metric where the stage merges by features, so the same groups and weights. A reducer whose groups
    would depend on the merged values is refused.

    Example:
        >>> from vtc.plan import Scorer
        >>> f, extra = torch.randn(1, 16, 4), torch.randn(1, 16, 2)
        >>> stage = Stage("vision", Scorer("none"), 5, reducer="merge")
        >>> merged, local = reduce_vision(stage, f, None, None)
        >>> both, _ = reduce_vision(stage, torch.cat([f, extra], -1), None, f)
        >>> torch.allclose(reduce_companions(stage, extra, local, f, None, None), both[..., 4:])
        True
    """
    if stage.reducer in SELECTIONS:
        return ops.gather_tokens(companions, local)
    again, where = reduce_vision(stage, companions, scores, feats if metric is None else metric, protected, layout)
    if not torch.equal(where, local):
        raise ValueError(f"vision reducer {stage.reducer!r} cannot reduce the model's per-token companion features "
                         f"(Qwen3-VL's DeepStack) as it reduced the tokens; use another pre-LLM method")
    return again


def _hired_official(stage: Stage, feats, scores, metric, layout) -> tuple[torch.Tensor, torch.Tensor]:
    """HiRED's official selection (:func:`vtc.ops.hired_official`): its own count per image, row
    ends dropped; images of one call must keep as many tokens (the adapter passes one at a time)."""
    options = dict(stage.options)
    keep = [ops.hired_official(scores[i], metric[i], layout["tile"][i], layout["band"][i],
                               options["rate"], options.get("alpha", 0.5)) for i in range(feats.shape[0])]
    if len({k.numel() for k in keep}) > 1:
        raise ValueError("hired official keeps a different count per image: reduce the images one at a time")
    keep = torch.stack(keep)
    return ops.gather_tokens(feats, keep), keep


def resized(stage: Stage, keep: int) -> Stage:
    """``stage`` keeping ``keep`` tokens instead, its counts scaled alike (an image smaller than the
    plan's, or a budget shared with protected tokens).

    Example:
        >>> from vtc.plan import Scorer
        >>> s = Stage("vision", Scorer("cls_attention", (22,)), 64, reducer="dominant+context",
        ...           options=(("dominant", 54),))
        >>> resized(s, 32).options
        (('dominant', 27),)
    """
    if keep == stage.keep:
        return stage
    options = tuple((k, min(max(1, round(v * keep / stage.keep)), max(keep - 1, 1))) if k == "dominant" else (k, v)
                    for k, v in stage.options)
    return dataclasses.replace(stage, keep=keep, options=options)
