"""Layer stages inside a Llama/Qwen2-style decoder, executed with forward pre-hooks.

The language model computes ``(cos, sin)``, ``position_ids`` and the causal mask once and
hands the same objects to every layer. To drop tokens before layer ``i`` a pre-hook on that
layer gathers the surviving rows of ``hidden_states``; every later layer's pre-hook then
swaps in the gathered ``(cos, sin)``, ``position_ids`` and mask (computed once per stage,
not per layer). In decode steps each layer's cache holds its own length, so a
materialized mask gets its key columns re-indexed per layer, and under ``compact``
positions the new token's RoPE position is shifted by what that layer dropped.

Nothing here names a model class: the layers are duck-typed (``input_layernorm``,
``self_attn.q_proj``/``k_proj``), which Llama, Qwen2, Mistral and their kin share.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from vtc import ops
from vtc.errors import UnsupportedConfigurationError
from vtc.plan import Stage

from .local import PerThread

LAYER_KWARGS = ("attention_mask", "position_ids", "cache", "position_embeddings")
# Scorers that run inside the LLM, from a decoder layer's input: (layer, hidden, (cos, sin), key_mask).
SCORERS = {"query_attention": ops.query_attention, "pagerank": ops.attention_pagerank}
# Selectors choose the rows themselves (a boolean keep-mask, not one score per row), from the keys and
# the output of the layer before their stage (LayerStages._select).
SELECTORS = ("dart",)
# Scorers that read the prefill's state: SparseVLM's raters (chosen from the LLM's input embeddings).
STATE_SCORERS = ("rater_attention",)


def check_layer_signature(layer: nn.Module) -> None:
    """Refuse a decoder layer whose forward no longer takes the arguments the hooks rewrite."""
    params = inspect.signature(layer.forward).parameters
    missing = [p for p in ("hidden_states", *LAYER_KWARGS) if p not in params]
    if missing:
        raise UnsupportedConfigurationError(
            f"{type(layer).__name__}.forward has no parameter(s) {missing}: this transformers version "
            f"changed the decoder layer interface vtc hooks into; install a supported transformers "
            f"(see vtc.MIN_TRANSFORMERS) or report it"
        )


@dataclass
class SequenceState:
    """Where the visual tokens are in the LLM's input sequence, and what survives so far.

    Built at prefill by the adapter; updated by each layer stage. ``rows`` holds, for the
    current sequence, each row's index in the LLM's prefill input (length ``length``);
    ``image_of`` the global index of a row's image (``-1`` for text, ``-2`` for a slot that
    pads a sample shortened more than others); ``key_valid`` whether a row may be attended to;
    ``keep_of`` each layer stage's keep count per image; ``kept`` each stage's surviving grid
    indices per image.
    """

    rows: torch.Tensor
    image_of: torch.Tensor
    key_valid: torch.Tensor
    length: int
    sample_of: list[int]
    keep_of: dict[str, list[int]]
    # Replacements handed to every layer after the latest stage (None until a stage runs).
    overrides: dict = field(default_factory=dict)
    # Each image row's index in its image's grid, by row of the LLM's input, for reporting.
    grid_of: torch.Tensor | None = None
    # Rows kept at every stage (LLaVA-NeXT's row ends), or None.
    protected: torch.Tensor | None = None
    # For decode: the rows each layer kept, which of them are real when some are padding slots
    # (None when none are), and by how much compact stages moved positions (per sample).
    layer_rows: dict[int, torch.Tensor] = field(default_factory=dict)
    layer_valid: dict[int, torch.Tensor | None] = field(default_factory=dict)
    layer_shift: dict[int, torch.Tensor | int] = field(default_factory=dict)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    kept: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    # Rows that are merged tokens made inside the LLM (recycling stages), or None while there are none.
    merged: torch.Tensor | None = None
    # SparseVLM's raters: for each image (global index), the prefill rows of the text tokens that rate it.
    raters: dict[int, torch.Tensor] = field(default_factory=dict)
    # Rows at the end of every sample that follow the prompt (assisted decoding's draft tokens,
    # verified in the same forward): never a query or key of scoring, and not the prompt that
    # decode steps continue (trimmed off by :meth:`prompt_only` before the first one).
    drafts: int = 0

    def scoring_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys scoring may read ``[B, n]`` (real rows of the prompt) and each sample's query row
        ``[B]``: its last real prompt row, so neither a right-padding row nor a draft token."""
        valid = self.key_valid
        if self.drafts:
            valid = valid.clone()
            valid[:, valid.shape[1] - self.drafts:] = False
        index = torch.arange(valid.shape[1], device=valid.device)
        return valid, torch.where(valid, index, -1).amax(dim=1).clamp_min(0)

    def prompt_only(self) -> None:
        """Forget the draft rows of the prefill: decode steps continue the prompt, and the cache is
        cropped to the drafts the model accepted (which then count as tokens after the prompt)."""
        d, self.drafts = self.drafts, 0
        if not d:
            return
        self.length -= d
        for i, rows in self.layer_rows.items():
            self.layer_rows[i] = rows[:, : rows.shape[1] - d]
            valid = self.layer_valid.get(i)
            if valid is not None:
                self.layer_valid[i] = valid[:, : valid.shape[1] - d]


def select_rows(
    scores: torch.Tensor, image_of: torch.Tensor, keep_of: list[int], protected: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows to keep: every text row, and the ``keep_of[g]`` best-scored rows of each image ``g``
    (protected rows first). Samples that keep fewer rows than others are left-padded.

    ``scores``, ``image_of`` (``-1`` text, ``-2`` padding slots, dropped) and ``protected`` are
    ``[B, n]``; returns sorted row indices ``[B, n']`` and the padding mask ``[B, n']``. Boolean
    ``scores`` are a selector's keep-mask: its chosen rows count as the best (a selector sizes its
    choice to ``keep_of[g]`` less the protected rows).

    Example:
        >>> select_rows(torch.tensor([[0., .1, .9, .5, .2]]), torch.tensor([[-1, 0, 0, 0, -1]]), [2])
        (tensor([[0, 2, 3, 4]]), tensor([[False, False, False, False]]))
        >>> select_rows(torch.tensor([[False, True, False, True, False]]), torch.tensor([[-1, 0, 0, 0, -1]]), [2])[0]
        tensor([[0, 1, 3, 4]])
    """
    if scores.dtype == torch.bool:
        scores = scores.float()
    if protected is not None:
        scores = scores.masked_fill(protected, float("inf"))
    chosen = []
    for b in range(scores.shape[0]):
        img = image_of[b]
        parts = [(img == -1).nonzero()[:, 0]]
        for g in img[img >= 0].unique().tolist():
            mine = (img == g).nonzero()[:, 0]
            k = keep_of[g]
            if k >= mine.numel():
                parts.append(mine)
            elif k > 0:
                parts.append(mine[ops.topk_keep(scores[b, mine][None], k)[0]])
        chosen.append(torch.cat(parts).sort().values)
    return ops.left_pad(chosen)


def dart_rows(keys: torch.Tensor, normed: torch.Tensor, state: SequenceState, keep_of: list[int],
              pivot_image: int = 4, pivot_text: int = 4) -> torch.Tensor:
    """DART's keep-mask ``[B, n]``: for each image ``g``, :func:`vtc.ops.dart_select` on the keys ``[B, n, C]``
    and normed hidden states ``[B, n, D]`` of the current rows, choosing ``keep_of[g]`` less its protected
    rows among the unprotected ones; the text pivots are the sample's real text rows after the image.
    The pivots' order follows their positions among the sample's real rows (what the official code,
    one unpadded sample at a time, calls their indices)."""
    valid, _ = state.scoring_rows()
    position = valid.long().cumsum(dim=1) - 1
    protected = state.protected if state.protected is not None else torch.zeros_like(valid)
    chosen = torch.zeros_like(valid)
    index = torch.arange(valid.shape[1], device=valid.device)
    for b in range(valid.shape[0]):
        img = state.image_of[b]
        for g in img[img >= 0].unique().tolist():
            mine = img == g
            rows = (mine & ~protected[b]).nonzero()[:, 0]
            text = ((img == -1) & valid[b] & (index > int(mine.nonzero()[-1, 0]))).nonzero()[:, 0]
            count = keep_of[g] - int((mine & protected[b]).sum())
            picked = ops.dart_select(keys[b], normed[b], rows, text, count, int(pivot_image), int(pivot_text),
                                     positions=position[b])
            chosen[b, picked] = True
    return chosen


def find_raters(hidden: torch.Tensor, state: SequenceState) -> dict[int, torch.Tensor]:
    """SparseVLM's raters of each image: :func:`vtc.ops.select_raters` on the LLM's input embeddings
    ``hidden`` ``[B, n, D]`` of the image and of the sample's real text rows after it; returned as
    prefill row indices (``state.rows``) per global image index."""
    valid, _ = state.scoring_rows()
    index = torch.arange(valid.shape[1], device=valid.device)
    raters = {}
    for b in range(valid.shape[0]):
        img = state.image_of[b]
        for g in img[img >= 0].unique().tolist():
            mine = img == g
            text = ((img == -1) & valid[b] & (index > int(mine.nonzero()[-1, 0]))).nonzero()[:, 0]
            chosen = text[ops.select_raters(hidden[b, mine], hidden[b, text])] if text.numel() else text
            raters[g] = state.rows[b, chosen]
    return raters


def rater_scores(layer: nn.Module, hidden: torch.Tensor, position_embeddings, state: SequenceState,
                 projections=None) -> torch.Tensor:
    """SparseVLM's relevance of every image row ``[B, n]`` (0 elsewhere): the attention of the image's
    raters (:func:`find_raters`) to it in ``layer`` (:func:`vtc.ops.queries_attention`, from the layer's
    input ``hidden``, all samples' raters in one call), averaged over heads and raters. An image without
    raters (no text after it) is rated by the sample's last prompt row."""
    key_mask, last = state.scoring_rows()
    scores = torch.zeros(hidden.shape[:2], device=hidden.device)
    bsz = hidden.shape[0]
    queries, chosen = [], []  # per sample: the query rows; per image: (sample, its rows' places among them)
    for b in range(bsz):
        img = state.image_of[b]
        rows = []
        for g in img[img >= 0].unique().tolist():
            mine = torch.isin(state.rows[b], state.raters.get(g, state.rows[b, :0])).nonzero()[:, 0].tolist()
            mine = mine or [int(last[b])]
            chosen.append((b, g, list(range(len(rows), len(rows) + len(mine)))))
            rows += mine
        queries.append(torch.tensor(rows or [int(last[b])], dtype=torch.long, device=hidden.device))
    width = max(q.numel() for q in queries)
    query_rows = torch.stack([torch.cat([q, q[-1:].expand(width - q.numel())]) for q in queries])
    att = ops.queries_attention(layer, hidden, position_embeddings, query_rows, key_mask, projections)
    for b, g, places in chosen:
        mine = (state.image_of[b] == g).nonzero()[:, 0]
        scores[b, mine] = ops.rater_relevance(att[b, places], mine)
    return scores


def recycle_rows(hidden: torch.Tensor, scores: torch.Tensor, state: SequenceState, totals: list[int],
                 share: float = 0.3, per_cluster: int = 10):
    """A recycling stage's rows: each image ``g`` keeps its best-scored rows and adds the merged tokens
    recycled from the rest (:func:`vtc.ops.recycled`: the most relevant ``share`` of the dropped rows,
    clustered by :func:`vtc.ops.dpc_merge`), ``totals[g]`` rows in all; the merged rows follow the
    image's last row, in cluster order (SparseVLM puts them right after the kept image tokens).

    Returns, per new row ``[B, n']``: the current row it copies its bookkeeping from (a merged row: the
    image's last row, for its mask column and, under kept positions, its position), the padding mask,
    whether it is merged, and the merged features in row-major order ``[m, D]``."""
    img_all = state.image_of
    counts = {}
    for b in range(img_all.shape[0]):
        img = img_all[b]
        for g in img[img >= 0].unique().tolist():
            counts[g] = ops.recycle_split(int((img == g).sum()), totals[g], share, per_cluster)
    keep, pad = select_rows(scores, img_all, [counts.get(g, 0) for g in range(len(totals))], state.protected)
    # Each image's recycled rows, most relevant first; images with the same counts are merged in one call.
    jobs, groups = [], {}
    for b in range(img_all.shape[0]):
        kept = keep[b][~pad[b]]
        img = img_all[b]
        images = sorted(img[img >= 0].unique().tolist(), key=lambda g: int((img == g).nonzero()[-1, 0]))
        for g in images:
            mine = (img == g).nonzero()[:, 0]
            dropped = mine[~torch.isin(mine, kept)]
            chosen, clusters = ops.recycled(dropped.numel(), share, per_cluster)
            if clusters:
                best = scores[b, dropped].float().sort(descending=True, stable=True).indices[:chosen]
                groups.setdefault((chosen, clusters), []).append(len(jobs))
                jobs.append((b, int(mine[-1]), clusters, dropped[best]))
    merged_of = {}
    for (_, clusters), members in groups.items():
        stacked = torch.stack([hidden[jobs[j][0], jobs[j][3]] for j in members])
        for j, out in zip(members, ops.dpc_merge(stacked, clusters)):
            merged_of[j] = out
    srcs, flags, feats = [], [], []
    for b in range(img_all.shape[0]):
        kept = keep[b][~pad[b]]
        key, src, flag = (2 * kept).tolist(), kept.tolist(), [False] * kept.numel()
        for j, (sample, anchor, clusters, _) in enumerate(jobs):
            if sample != b:
                continue
            feats.append(merged_of[j])
            key += [2 * anchor + 1] * clusters
            src += [anchor] * clusters
            flag += [True] * clusters
        order = torch.tensor(key, dtype=torch.float64).sort(stable=True).indices
        srcs.append(torch.tensor(src, dtype=torch.long, device=keep.device)[order])
        flags.append(torch.tensor(flag, dtype=torch.bool, device=keep.device)[order])
    src, pad = ops.left_pad(srcs)
    merged, _ = ops.left_pad(flags)
    merged = merged & ~pad
    return src, pad, merged, torch.cat(feats) if feats else hidden.new_zeros(0, hidden.shape[-1])


def causal_mask(like: torch.Tensor | None, valid: torch.Tensor, flash: bool) -> torch.Tensor | None:
    """A fresh prefill mask for rows in causal order (a stage that made new rows): causal by row, keys
    where ``valid`` ``[B, n]``; the same kind as ``like`` (the mask the layers received: None, 2-D,
    4-D boolean or additive). None where nothing is masked but causality."""
    if like is None and bool(valid.all()):
        return None
    if flash or (like is not None and like.dim() == 2):
        return valid.long()
    n = valid.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=valid.device).tril()
    allowed = ((causal[None] & valid[:, None, :]) | torch.eye(n, dtype=torch.bool, device=valid.device))[:, None]
    if like is None or like.dtype == torch.bool:
        return allowed
    additive = torch.zeros(allowed.shape, dtype=like.dtype, device=like.device)
    return additive.masked_fill(~allowed, torch.finfo(like.dtype).min)


def mask_columns(mask: torch.Tensor | None, valid: torch.Tensor, rows: torch.Tensor, flash: bool,
                 new: int = 0, queries: int = 1) -> torch.Tensor:
    """Forbid attending to the keys where ``valid`` ``[B, K]`` is False, in the mask a decoder
    layer receives: a 4-D boolean (sdpa) or additive (eager) mask, a 2-D padding mask (flash
    attention), or None: then one is built, causal by ``rows`` (the keys' original order) at
    prefill, or in decode steps over the ``new`` tokens after the prompt for ``queries`` rows."""
    if new:
        valid = torch.cat([valid, valid.new_ones(valid.shape[0], new)], dim=1)
    if mask is None:
        if flash:
            return valid.long()
        bsz = valid.shape[0]
        if new:
            prompt = valid.shape[1] - new
            ahead = torch.arange(new, device=valid.device)
            later = ahead[None] <= torch.arange(new - queries, new, device=valid.device)[:, None]
            allowed = torch.cat([valid.new_ones(bsz, queries, prompt), later[None].expand(bsz, -1, -1)], dim=2)
            return (allowed & valid[:, None, :])[:, None]
        causal = rows[:, None, :] <= rows[:, :, None]
        itself = torch.eye(rows.shape[1], dtype=torch.bool, device=rows.device)
        return ((causal & valid[:, None, :]) | itself)[:, None]
    if mask.dim() == 2:
        return mask * valid
    if mask.dtype == torch.bool:
        return mask & valid[:, None, None, :]
    return mask.masked_fill(~valid[:, None, None, :], torch.finfo(mask.dtype).min)


def gather_mask(mask: torch.Tensor | None, rows: torch.Tensor | None, cols: torch.Tensor) -> torch.Tensor | None:
    """Gather a 2-D ``[B, K]`` (key columns only) or 4-D ``[B, 1, Q, K]`` attention mask to the given
    query rows and key columns."""
    if mask is None:
        return None
    if mask.dim() == 2:
        return ops.gather_tokens(mask, cols, dim=1)
    if rows is not None:
        mask = ops.gather_tokens(mask, rows, dim=2)
    return ops.gather_tokens(mask, cols, dim=3)


class LayerStages:
    """Installs the layer stages of a plan as forward pre-hooks on decoder layers.

    ``layers`` are the decoder layers, ``rotary`` the language model's rotary embedding module
    (``rotary(x, position_ids) -> (cos, sin)``), ``state`` a callable returning the current
    :class:`SequenceState` (or None when the forward has no image).
    """

    def __init__(
        self,
        layers: nn.ModuleList,
        rotary: nn.Module,
        stages: tuple[Stage, ...],
        state: Callable[[], SequenceState | None],
        decoding: Callable[[], dict | None],
        flash: bool = False,
        norm: nn.Module | None = None,
    ) -> None:
        self.layers, self.rotary, self.stages = layers, rotary, stages
        self.norm = norm  # the language model's final norm (DART compares normed hidden states)
        self.flash = flash  # flash attention takes a 2-D padding mask, not a 4-D one
        self.state, self.decoding = state, decoding
        self.by_layer = {s.layer: s for s in stages}
        # Which stage each scoring layer serves. A score for a stage at the same layer is taken
        # on the rows entering it (PyramidDrop); one for a later stage on the rows this layer
        # keeps, i.e. what its attention actually sees (FastV, AIM).
        self.score_layers = {s.scorer.layers[0]: s for s in stages
                             if s.scorer.kind in (*SCORERS, *SELECTORS, *STATE_SCORERS)}
        for s in stages:
            if s.scorer.kind in SELECTORS and s.scorer.layers[0] >= s.layer:
                raise UnsupportedConfigurationError(f"{s.scorer.kind} at {s.where} reads an earlier layer's "
                                                    f"output: score it at a layer before {s.layer}")
        # A score for a later stage is taken after the scoring layer ran, from the q and k
        # projections its own attention computed: scoring then costs no projection.
        self.after_layers = {i: s for i, s in self.score_layers.items() if s.layer > i}
        self.first = min([*self.by_layer, *self.score_layers]) if stages else len(layers)
        # SparseVLM's raters are chosen from the LLM's input: the first layer's.
        self.needs_raters = any(s.scorer.kind == "rater_attention" for s in stages)
        if self.needs_raters:
            self.first = 0
        self.handles: list = []

    # Per call (per thread): the scoring layer whose projections are being captured, and them.
    _armed = PerThread()
    _projections = PerThread(dict)

    def install(self) -> None:
        for i, layer in enumerate(self.layers):
            if i >= self.first:
                check_layer_signature(layer)
                self.handles.append(layer.register_forward_pre_hook(self._hook(i), with_kwargs=True))
            if i in self.after_layers:
                for name in ("q_proj", "k_proj"):
                    proj = getattr(layer.self_attn, name)
                    self.handles.append(proj.register_forward_hook(self._capture(i, name[0])))
                self.handles.append(layer.register_forward_hook(self._after(i), with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, index: int):
        def hook(module, args, kwargs):
            if index == self.first:
                self._disarm()  # nothing left over from a forward that raised
            step = self.decoding()
            if step is not None:
                return self._decode(index, args, kwargs, step)
            state = self.state()
            if state is None:
                return None
            return self._prefill(module, index, args, kwargs, state)

        return hook

    def _prefill(self, module, index, args, kwargs, state: SequenceState):
        if "position_embeddings" not in kwargs:
            raise UnsupportedConfigurationError(
                f"decoder layer {index} was called without `position_embeddings`: the language model's "
                f"forward changed; vtc cannot place its layer stages"
            )
        kwargs.update(state.overrides)
        hidden = args[0] if args else kwargs["hidden_states"]
        if index == 0 and self.needs_raters:
            state.raters = find_raters(hidden, state)
        scoring = self.score_layers.get(index)
        if scoring is not None and scoring.layer == index:
            state.scores[index] = self._score(scoring, module, hidden, kwargs, state)
        stage = self.by_layer.get(index)
        if scoring is not None and scoring.layer != index:
            self._armed = index  # scored in _after, on the rows this layer keeps
        if stage is None:
            return args, kwargs
        scores, merged = state.scores.pop(index), None
        if stage.reducer == "recycle":
            # Each kept row, and the merged rows, by the row they copy their bookkeeping from.
            keep, pad, merged, feats = recycle_rows(hidden, scores, state, state.keep_of[stage.where],
                                                    **dict(stage.options))
        else:
            keep, pad = select_rows(scores, state.image_of, state.keep_of[stage.where], state.protected)
        valid_before = state.key_valid
        hidden = ops.gather_tokens(hidden, keep)
        if merged is not None:
            hidden = hidden.masked_scatter(merged[..., None], feats.to(hidden.dtype))
        state.rows = ops.gather_tokens(state.rows, keep)
        state.image_of = ops.gather_tokens(state.image_of, keep).masked_fill(pad, -2)
        state.key_valid = ops.gather_tokens(state.key_valid, keep) & ~pad
        if state.protected is not None:
            state.protected = ops.gather_tokens(state.protected, keep) & ~pad
            if merged is not None:
                state.protected = state.protected & ~merged
        if state.merged is not None or merged is not None:
            was = ops.gather_tokens(state.merged, keep) & ~pad if state.merged is not None else torch.zeros_like(pad)
            state.merged = was if merged is None else was | merged
        grid = ops.gather_tokens(state.grid_of, state.rows)
        original = state.image_of if state.merged is None else state.image_of.masked_fill(state.merged, -3)
        state.kept[stage.where] = [grid[b][original[b] == g] for g, b in enumerate(state.sample_of)]
        # Qwen's M-RoPE layers get no position_ids (their positions are in (cos, sin) only).
        pos = None if kwargs.get("position_ids") is None else ops.gather_tokens(kwargs["position_ids"], keep)
        compact = stage.positions == "compact"
        if compact:
            # Re-index survivors contiguously: each row moves back by the real rows this stage
            # dropped before it (earlier stages' drops are already in the positions).
            before = valid_before.long().cumsum(dim=1) - valid_before.long()
            rank = state.key_valid.long().cumsum(dim=1) - state.key_valid.long()
            pos = pos - (ops.gather_tokens(before, keep) - rank)
            cos, sin = self.rotary(hidden, pos)
        else:
            cos, sin = (ops.gather_tokens(t, keep) for t in kwargs["position_embeddings"])
        slots = bool(pad.any())
        if merged is not None:
            # New rows have no row of the mask to gather: a fresh one, causal in the new order.
            mask = causal_mask(kwargs.get("attention_mask"), state.key_valid, self.flash)
        else:
            mask = gather_mask(kwargs.get("attention_mask"), keep, keep)
            # Padding slots last until the next stage, which drops them (and may pad anew).
            if slots:
                # Causal by prompt row; after merged rows (which repeat their anchor's row) by sequence order.
                order = state.rows if state.merged is None else torch.arange(
                    hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
                mask = mask_columns(mask, state.key_valid, order, self.flash)
        state.overrides = {"position_embeddings": (cos, sin), "position_ids": pos, "attention_mask": mask}
        kwargs.update(state.overrides)
        shift = state.layer_shift.get(index, 0)
        if compact:
            shift = shift + (valid_before.sum(dim=1, keepdim=True) - state.key_valid.sum(dim=1, keepdim=True))
        for later in range(index, len(self.layers)):
            state.layer_rows[later] = state.rows
            state.layer_valid[later] = state.key_valid if slots else None
            state.layer_shift[later] = shift
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    @staticmethod
    def _score(stage: Stage, module, hidden, kwargs, state: SequenceState, projections=None) -> torch.Tensor:
        if stage.scorer.kind == "rater_attention":
            return rater_scores(module, hidden, kwargs["position_embeddings"], state, projections)
        scorer = SCORERS[stage.scorer.kind]
        options = dict(stage.scorer.options)
        key_mask, query = state.scoring_rows()
        if scorer is ops.query_attention and "query_index" not in options:
            options["query_index"] = query
        return scorer(module, hidden, kwargs["position_embeddings"], key_mask=key_mask,
                      projections=projections, **options)

    def _select(self, stage: Stage, module, hidden, output, kwargs, state: SequenceState,
                projections) -> torch.Tensor:
        """A selector's keep-mask ``[B, n]`` for ``stage``, from the layer ``module`` before it: its input
        ``hidden``, its ``output`` and the ``projections`` its attention computed."""
        keys = ops.layer_keys(module, hidden, kwargs["position_embeddings"], projections)
        if self.norm is None:
            raise UnsupportedConfigurationError(f"{stage.scorer.kind} needs the language model's final norm")
        return dart_rows(keys, self.norm(output), state, state.keep_of[stage.where], **dict(stage.scorer.options))

    def _disarm(self) -> None:
        self._armed = None
        self._projections.clear()

    def _capture(self, index: int, name: str):
        def hook(module, args, output):
            if self._armed == index:
                self._projections[name] = output

        return hook

    def _after(self, index: int):
        def hook(module, args, kwargs, output):
            if self._armed != index:
                return None
            projections = (self._projections["q"], self._projections["k"])
            self._disarm()
            hidden = args[0] if args else kwargs["hidden_states"]
            stage = self.after_layers[index]
            state = self.state()
            if stage.scorer.kind in SELECTORS:
                output = output[0] if isinstance(output, tuple) else output
                state.scores[stage.layer] = self._select(stage, module, hidden, output, kwargs, state, projections)
            else:
                state.scores[stage.layer] = self._score(stage, module, hidden, kwargs, state, projections)
            return None

        return hook

    def _decode(self, index, args, kwargs, step: dict):
        state: SequenceState | None = step.get("state")
        if state is None or index not in state.layer_rows:
            return None
        rows, valid = state.layer_rows[index], state.layer_valid[index]
        mask = kwargs.get("attention_mask")
        if mask is not None or valid is not None:
            # Layers between two stages share their survivors: make their mask once per step.
            masks = step.setdefault("masks", {})
            if id(rows) not in masks:
                hidden = args[0] if args else kwargs["hidden_states"]
                if mask is not None:
                    new = torch.arange(state.length, mask.shape[-1], device=rows.device).expand(rows.shape[0], -1)
                    mask = gather_mask(mask, None, torch.cat([rows, new], dim=1))
                if valid is not None:
                    mask = mask_columns(mask, valid, rows, self.flash, new=step["new"], queries=hidden.shape[1])
                masks[id(rows)] = mask
            kwargs["attention_mask"] = masks[id(rows)]
        shift = state.layer_shift[index]
        if isinstance(shift, torch.Tensor) or shift:
            # Under compact positions a new token sits right after this layer's survivors.
            cached = step.setdefault("rope", {})
            if id(shift) not in cached:
                pos = kwargs["position_ids"] - shift
                hidden = args[0] if args else kwargs["hidden_states"]
                cached[id(shift)] = (pos, self.rotary(hidden, pos))
            kwargs["position_ids"], kwargs["position_embeddings"] = cached[id(shift)]
        return args, kwargs
