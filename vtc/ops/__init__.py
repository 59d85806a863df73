"""Pure tensor operators for visual token reduction, usable in any pipeline.

Nothing here knows a model family: selection (:func:`topk_keep`, :func:`gather_tokens`),
attention scores from a module's own projections (:func:`query_attention`,
:func:`cls_attention`), merging (:func:`bipartite_soft_matching`, :func:`merge_to`,
:func:`dominant_and_context`; :func:`tome_matching` inside a ViT block) and pooling
(:func:`pool_grid`; :func:`pool_frames` for rectangular grids per temporal group);
diversity (:func:`divprune_select`, :func:`vispruner_select`,
:func:`dpp_select` with :func:`instruction_relevance`); the image resized for the tower
(:func:`resize_images`, :func:`downsampled_grid`, :func:`grid_centres`); duplication (:func:`dart_select`);
text relevance (:func:`select_raters`, :func:`rater_relevance`, :func:`queries_attention`); recycling
(:func:`dpc_merge`, :func:`recycled`); a video's frames pruned against each other (:func:`temporal_prune`).

Example:
    >>> import torch
    >>> from vtc import ops
    >>> feats, scores = torch.randn(1, 576, 64), torch.rand(1, 576)
    >>> ops.gather_tokens(feats, ops.topk_keep(scores, 64)).shape
    torch.Size([1, 64, 64])
"""

from .attention import (
    apply_rope,
    attention_pagerank,
    cls_attention,
    layer_keys,
    queries_attention,
    query_attention,
    rotate_half,
)
from .cluster import dpc_merge, recycle_split, recycled
from .diversity import divprune_select, vispruner_select
from .dpp import dpp_select, instruction_relevance
from .duplication import dart_select, pivot_shares
from .grid import grid_fit, pool_frames
from .merge import bipartite_soft_matching, merge_weighted, tome_matching
from .reduce import dominant_and_context, hired_official, hired_select, merge_to, pool_grid, share
from .relevance import rater_relevance, select_raters
from .resize import downsampled_grid, grid_centres, resize_images
from .select import gather_tokens, left_pad, runs, topk_keep
from .temporal import temporal_prune, temporal_prune_counts

__all__ = [
    "apply_rope",
    "attention_pagerank",
    "bipartite_soft_matching",
    "cls_attention",
    "dart_select",
    "divprune_select",
    "dpc_merge",
    "dominant_and_context",
    "downsampled_grid",
    "dpp_select",
    "gather_tokens",
    "grid_centres",
    "grid_fit",
    "hired_official",
    "hired_select",
    "instruction_relevance",
    "layer_keys",
    "left_pad",
    "merge_to",
    "merge_weighted",
    "pivot_shares",
    "pool_frames",
    "pool_grid",
    "queries_attention",
    "query_attention",
    "rater_relevance",
    "recycle_split",
    "recycled",
    "resize_images",
    "rotate_half",
    "runs",
    "select_raters",
    "share",
    "temporal_prune",
    "temporal_prune_counts",
    "tome_matching",
    "topk_keep",
    "vispruner_select",
]
