"""What every adapter shares: reversible instance patching and the execution of a plan.

An adapter (:class:`~vtc.patches.adapter.Adapter`) knows one model family (where the vision
tower, the image placeholders and the decoder layers are); :class:`Installation` executes
any plan on it:

* ``vision`` stages run in a wrapper of the base model's ``forward``: the image features and
  their placeholders are reduced together (``input_ids``, ``attention_mask`` and
  ``position_ids`` gathered consistently), so the model's own placeholder check still holds;
* [CLS] scores are read by forward pre-hooks on the vision attention modules while the
  tower runs, and carried on the tower's output object to the forward that uses them
  (``generate`` encodes images before the first forward, and may expand the features);
* ``layer`` stages run in decoder-layer pre-hooks (:mod:`vtc.patches.decoder`).

Only instances are patched; nothing in ``transformers.models`` is rebound, and
:meth:`Installation.remove` restores every attribute it replaced.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from typing import Any

import torch
from torch import nn

from vtc import ops
from vtc.errors import UnsupportedConfigurationError, VtcError
from vtc.flops import Stats, make_stats
from vtc.plan import Plan, Stage
from vtc.reduce import reduce_companions, reduce_vision, resized

from .adapter import Adapter
from .decoder import LayerStages, SequenceState
from .local import PerThread
from .tome import padded, tower_merge

_MISSING = object()
# Set on the vision output: per pooler_output entry, {"cls(<layers>)": [N], "keys<L>": [N, C],
# "layout.<name>": [N] (the adapter's layout)}.
SIGNALS_ATTR = "vtc_signals"
# Set on a cache (``cache.__dict__``) by the prefill that filled it: what decode steps and later
# turns over that cache need (see :meth:`Installation._decode_step`).
CACHE_ATTR = "_vtc"
# Set on the vision output under a ``downsample`` stage: per entry, each feature's original token (-1: padding).
DOWNSAMPLED_ATTR = "vtc_downsampled"


class Installation:
    """A plan installed on one model instance; :meth:`remove` undoes it exactly.

    State of one call lives per thread (:class:`~vtc.patches.local.PerThread`), and what decode
    steps need rides on the cache the prefill filled, so one instance serves concurrent calls
    and several conversations (each with its own cache) at once.
    """

    # Per call (per thread): the [CLS] rows and keys captured while the tower runs, the signals
    # of the latest encoding (found by content when a device hook copied the encoder output),
    # the prefill's vision reduction and sequence state (moved onto the cache after the
    # forward), the decode step's scratch (None at prefill), the prompt length of the running
    # ``generate`` (rows after it are draft tokens), and the record the forward will attach.
    _captured = PerThread(dict)
    _signals = PerThread()
    _vision = PerThread()
    _seq = PerThread()
    _step = PerThread()
    _prompt = PerThread()
    _record = PerThread()
    _labels = PerThread()  # a training forward's labels, held back from the model (see _loss)
    _encoding = PerThread()  # inside a wrapped encoder call (an encoder that calls another is read once)

    def __init__(self, adapter: Adapter, plan: Plan) -> None:
        self.adapter, self.plan = adapter, plan
        self.info = adapter.info()
        adapter.check_plan(plan)
        self.base = adapter.base()
        self._saved: list[tuple[nn.Module, str, Any]] = []
        self._handles: list = []
        self.model = adapter.model
        self.last_stats: Stats | None = None
        # A stage that keeps every token it receives is skipped: no scoring, no gather.
        reaching = [plan.image_tokens, *(s.keep for s in plan.stages)]
        active = tuple(s for s, n in zip(plan.stages, reaching) if s.keep < n)
        # What actually runs, for the accounting (a skipped stage costs no scoring).
        self.active_plan = dataclasses.replace(plan, stages=active)
        self.vision_stages = tuple(s for s in active if s.layer is None)
        # A ``tome`` stage merges inside the vision tower (patches/tome.py): features arrive reduced.
        self.tower = tower_merge(adapter, self.vision_stages)
        self.layer_stages = LayerStages(
            adapter.decoder_layers(), adapter.rotary(), tuple(s for s in active if s.layer is not None),
            state=lambda: self._seq, decoding=lambda: self._step,
            flash="flash" in adapter.attention_implementation(), norm=adapter.final_norm(),
        )
        # Each set of vision layers whose [CLS] attention a stage reads (as its scores or metric).
        self.cls_sets = sorted({t.layers for s in self.vision_stages for t in (s.scorer, s.metric)
                                if t is not None and t.kind == "cls_attention"})
        self.cls_layers = sorted({i for layers in self.cls_sets for i in layers})
        # Each set of vision layers whose attention received per patch a stage reads (towers without [CLS]).
        self.recv_sets = sorted({t.layers for s in self.vision_stages for t in (s.scorer, s.metric)
                                 if t is not None and t.kind == "received_attention"})
        self.recv_layers = sorted({i for layers in self.recv_sets for i in layers})
        self.key_layers = sorted({s.metric.layers[0] for s in self.vision_stages
                                  if s.metric is not None and s.metric.kind == "keys"})
        self.mean_key_layers = sorted({s.metric.layers[0] for s in self.vision_stages
                                       if s.metric is not None and s.metric.kind == "mean_keys"})
        # Stages that reduce the tower's features before the projector (VisionZip on LLaVA-1.5).
        self.needs_hidden = any(dict(s.options).get("pre") for s in self.vision_stages)
        for j, s in enumerate(self.vision_stages):
            if dict(s.options).get("pre") and any(t.reducer != "topk" for t in self.vision_stages[:j]):
                raise UnsupportedConfigurationError(
                    f"a {s.reducer} stage that merges before the projector cannot follow a stage that merges or "
                    f"pools: put it first among the vision stages"
                )
        # Stages that weigh tokens by the instruction's embeddings (CDPruner).
        self.needs_text = any(s.reducer == "cdpruner" for s in self.vision_stages)
        # A stage that resizes the images so that the tower itself gives fewer tokens (downsample).
        self.resize = next((s for s in self.vision_stages if s.reducer == "downsample"), None)
        if self.resize is not None and len(self.vision_stages) > 1:
            raise UnsupportedConfigurationError(
                "downsample changes the image the vision tower sees, so no other stage can reduce before the LLM; "
                "combine it with in-LLM methods only")
        self.needs_tower = bool(self.cls_layers or self.recv_layers or self.key_layers or self.mean_key_layers)

    # -- install / remove --------------------------------------------------------------
    def install(self) -> None:
        try:
            self._wrap(self.base, "forward", self._forward_wrapper)
            if hasattr(self.model, "generate"):
                self._wrap(self.model, "generate", self._generate_wrapper)
            self._handles.append(self.model.register_forward_pre_hook(self._take_labels, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(self._loss, with_kwargs=True))
            wrap = self.needs_tower or self.needs_hidden or self.adapter.has_layout
            if wrap or self.tower is not None or self.resize is not None:
                self._wrap(self.base, "get_image_features", self._features_wrapper)
                if self.adapter.video_token_id is not None:  # a video's tower signals, read the same way
                    self._wrap(self.base, "get_video_features", self._features_wrapper)
                for layer in sorted({*self.cls_layers, *self.recv_layers, *self.key_layers, *self.mean_key_layers}):
                    module = self.adapter.vision_attention(layer)
                    self._handles.append(module.register_forward_pre_hook(self._capture(layer), with_kwargs=True))
            if self.tower is not None:
                self.tower.install()
            if self.layer_stages.stages:
                # What the family's LLM does besides its decoder layers that must follow their rows (DeepStack).
                for module, name, make in self.adapter.llm_wrappers(lambda: self._seq):
                    self._wrap(module, name, make)
            self.layer_stages.install()
        except Exception:
            self.remove()
            raise

    def remove(self) -> None:
        self.layer_stages.remove()
        if self.tower is not None:
            self.tower.remove()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module, name, previous in reversed(self._saved):
            if previous is _MISSING:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = previous
        self._saved.clear()
        self._vision = self._seq = self._step = self._record = self._signals = None

    def _wrap(self, module: nn.Module, name: str, make) -> None:
        original = getattr(module, name)
        wrapper = make(original)
        self._saved.append((module, name, module.__dict__.get(name, _MISSING)))
        # An instance attribute shadows the class's method for this object only.
        module.__dict__[name] = wrapper

    # -- the model's generate and forward ------------------------------------------------
    def _generate_wrapper(self, original):
        @functools.wraps(original)
        def generate(*args, **kwargs):
            config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
            if kwargs.get("prefill_chunk_size") or getattr(config, "prefill_chunk_size", None):
                raise UnsupportedConfigurationError(
                    "vtc cannot run a chunked prefill (prefill_chunk_size): it reduces the image tokens of the "
                    "whole prompt in one forward. Pass prefill_chunk_size=None, or vtc.remove(model) first"
                )
            ids = kwargs.get("input_ids", args[0] if args else None)
            previous = self._prompt
            # The prompt's length: rows beyond it in a prefill are draft tokens (assisted decoding).
            self._prompt = ids.shape[1] if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None
            try:
                return original(*args, **kwargs)
            finally:
                self._prompt = previous

        return generate

    def _take_labels(self, module, args, kwargs):
        """A training forward: the model would compare logits of the surviving rows with labels of
        every row. Hold the labels back; :meth:`_loss` gathers them to the survivors."""
        self._labels = None
        if kwargs.get("labels") is None:
            return None
        self._labels = kwargs.pop("labels")
        return args, kwargs

    def _loss(self, module, args, kwargs, out):
        """The loss of a training forward, over the rows that survived: each keeps its own label
        (padding slots and dropped rows none), so the model's shifted cross-entropy pairs every
        surviving row with the next surviving one. Text rows always survive, so a text label is
        predicted from the same text as without vtc; a row before dropped image rows predicts the
        next surviving one (an image row: commonly ignored, -100)."""
        labels, self._labels = self._labels, None
        if labels is None or getattr(out, "logits", None) is None:
            return None
        bsz, total = labels.shape
        rows = torch.arange(total, device=labels.device).expand(bsz, -1)
        valid = torch.ones_like(rows, dtype=torch.bool)
        if self._vision is not None:  # rows the vision stages kept, padding slots invalid
            rows, valid = self._vision["rows"], self._vision["valid"]
        if self._seq is not None:  # then the rows every layer stage kept
            rows = ops.gather_tokens(rows, self._seq.rows)
            valid = ops.gather_tokens(valid, self._seq.rows) & (self._seq.image_of != -2)
        if rows.shape[1] != out.logits.shape[1]:
            raise UnsupportedConfigurationError(
                f"vtc cannot align labels with the {out.logits.shape[1]} logits rows of this forward "
                f"(logits_to_keep?): pass labels with a forward that returns every surviving row"
            )
        labels = ops.gather_tokens(labels, rows.to(labels.device)).masked_fill(~valid.to(labels.device), -100)
        vocab = getattr(self.model.config, "text_config", self.model.config).vocab_size
        loss = self.model.loss_function(logits=out.logits, labels=labels, vocab_size=vocab)
        return type(out)(loss=loss, **{k: v for k, v in out.items() if k != "loss"})

    # -- the base forward --------------------------------------------------------------
    def _forward_wrapper(self, original):
        sig = inspect.signature(original)
        missing = [p for p in self.adapter.forward_params if p not in sig.parameters]
        if missing:
            raise UnsupportedConfigurationError(
                f"{type(self.base).__name__}.forward no longer takes {missing}: this transformers version "
                f"changed the interface vtc wraps; install a supported version (vtc.MIN_TRANSFORMERS)"
            )

        variadic = [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]

        @functools.wraps(original)
        def forward(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            self._record = None
            self._before_forward(bound.arguments)
            # Everything by name: decorators of the forward fill in config defaults by name.
            named = {k: v for k, v in bound.arguments.items() if k not in variadic}
            out = original(**named, **{k: v for name in variadic for k, v in bound.arguments[name].items()})
            record, self._record = self._record, None
            cache = getattr(out, "cache", None)
            if record is not None and cache is not None:
                # Decode steps and later turns over this cache find the prefill's state on it.
                cache.__dict__[CACHE_ATTR] = record
            return out

        return forward

    def _before_forward(self, a: dict) -> None:
        cache = a.get("cache")
        if cache is not None and getattr(cache, "is_compileable", False):
            raise UnsupportedConfigurationError(
                "vtc cannot run with a static (compileable) cache: layers keep different numbers of "
                "tokens. Use the default dynamic cache (do not pass cache_implementation='static')"
            )
        if cache is not None and cache.get_seq_length() > 0:
            self._decode_step(a)
            return
        self._step = None
        self._vision = self._seq = None
        if cache is not None:
            cache.__dict__.pop(CACHE_ATTR, None)
        ids = a["input_ids"]
        has_images = a["pixel_values"] is not None or (a["mm_encoder_outputs"] or {}).get("image") is not None
        if ids is None:
            if has_images:
                raise VtcError("vtc locates image tokens by input_ids: pass input_ids, not inputs_embeds")
            return
        image_mask = (ids == self.adapter.image_token_id) & has_images
        # A video (adapters with video_token_id) is reduced like an image: one entry, all its frames jointly.
        video = self.adapter.video_token_id
        has_videos = video is not None and (a.get("pixel_values_videos") is not None
                                            or (a["mm_encoder_outputs"] or {}).get("video") is not None)
        video_mask = (ids == video) & has_videos if video is not None else torch.zeros_like(image_mask)
        if not bool(image_mask.any()) and not bool(video_mask.any()):
            self.last_stats = make_stats(self.info, self.active_plan, ids.shape[1], 0)
            return
        self._prefill(a, ids, image_mask, video_mask)

    def _prefill(self, a: dict, ids: torch.Tensor, image_mask: torch.Tensor, video_mask: torch.Tensor) -> None:
        mm = dict(a["mm_encoder_outputs"] or {})
        out = mm.get("image")
        if out is None and bool(image_mask.any()):
            out = self.adapter.encode_images(a)
        images = self._images(out, image_mask) if out is not None else []
        vout, n_images = None, len(images)
        if bool(video_mask.any()):
            if self.tower is not None:
                raise UnsupportedConfigurationError(
                    f"{self.plan.method} merges inside the vision tower and cannot reduce video: pass images only, "
                    f"or a method that reduces after the tower")
            vout = mm.get("video")
            if vout is None:
                vout = self.adapter.encode_videos(a)
            images += self._images(vout, video_mask)
        image_mask = image_mask | video_mask
        bsz, total = ids.shape
        # Rows after the prompt of the running generate: assisted decoding's draft tokens, verified
        # in this same forward. They are text (kept); scoring and decode steps leave them out.
        prompt = self._prompt
        drafts = total - prompt if prompt is not None and 0 < prompt < total else 0
        if self.needs_text:
            self._instructions(a, ids, image_mask, images, drafts)
        kept: dict[str, list[torch.Tensor]] = {}
        for i, stage in enumerate(self.vision_stages):
            kept[stage.where] = self._reduce_images(i, stage, images)
        rows = pad = None
        if self.vision_stages:
            compact = any(s.positions == "compact" for s in self.vision_stages)
            # Each sample keeps its text and its images' surviving placeholders.
            keep = [(~image_mask[b]).nonzero()[:, 0] for b in range(bsz)]
            for im in images:
                keep[im.sample] = torch.cat([keep[im.sample], im.rows[im.index]])
            rows, pad = ops.left_pad([r.sort().values for r in keep])
            ragged = bool(pad.any())  # samples shortened unequally
            self.adapter.prefill_positions(a)
            shift = self._reduce_inputs(a, rows, pad, ragged, compact)
            if out is not None:
                out = copy.copy(out)
                out.pooler_output = self.adapter.pooler_output([im.feats for im in images[:n_images]])
                self.adapter.set_companions(out, [im.companions for im in images[:n_images]])
            if vout is not None:
                vout = copy.copy(vout)
                vout.pooler_output = self.adapter.video_pooler_output([im.feats for im in images[n_images:]])
                self.adapter.set_companions(vout, [im.companions for im in images[n_images:]])
            real = (~pad).sum(dim=1, keepdim=True)
            width = rows.shape[1] - drafts  # the drafts are the last columns of every sample
            self._vision = {"rows": rows[:, :width], "valid": ~pad[:, :width], "ragged": ragged,
                            "length": total - drafts, "dropped": total - real if shift is None else shift,
                            "compact": compact}
        # Hand over the features computed here, so the original forward does not encode again.
        mm["image"] = out
        if vout is not None:
            mm["video"], a["pixel_values_videos"] = vout, None
        a["mm_encoder_outputs"], a["pixel_values"] = mm, None
        self.adapter.encode_others(a)  # the model takes encoder outputs or pixels, not both
        if self.layer_stages.stages:
            image_of, grid_of, protected = self._row_maps(ids, images)
            if rows is not None:  # to the rows the vision stages kept
                image_of = ops.gather_tokens(image_of, rows).masked_fill(pad, -2)
                grid_of = ops.gather_tokens(grid_of, rows)
                protected = ops.gather_tokens(protected, rows) & ~pad
            new_ids, mask = a["input_ids"], a["attention_mask"]
            first = len(self.vision_stages)
            self._seq = SequenceState(
                rows=torch.arange(new_ids.shape[1], device=new_ids.device).expand(bsz, -1),
                image_of=image_of,
                key_valid=torch.ones_like(new_ids, dtype=torch.bool) if mask is None else mask.bool(),
                length=new_ids.shape[1],
                sample_of=[im.sample for im in images],
                grid_of=grid_of,
                protected=protected if bool(protected.any()) else None,
                keep_of={s.where: [im.keeps[first + j] for im in images]
                         for j, s in enumerate(self.layer_stages.stages)},
                kept=kept,
                drafts=drafts,
            )
            kept = self._seq.kept  # layer stages add their survivors to the same record
        self._record = {"vision": self._vision, "seq": self._seq,
                        # Positions of the prompt the cache holds no row for (a uniform count: with
                        # unequal drops the shorter samples hold padding slots).
                        "offset": 0 if rows is None else total - rows.shape[1]}
        first = [im for im in images if im.sample == 0]
        sizes = [im.size for im in first]
        text = total - drafts - sum(sizes)
        self.last_stats = make_stats(self.info, self.active_plan, text, sizes, kept, self.adapter.vision_hidden_size(),
                                     keeps=[im.keeps for im in first])

    def _instructions(self, a: dict, ids: torch.Tensor, visual: torch.Tensor, images: list[Image], drafts: int) -> None:
        """Give each image the input embeddings of the instruction it is asked about (stages that read the text:
        ``cdpruner``): its sample's text rows after the sample's last image or video row (the question, as the
        official CDPruner passes it, here with the chat template's tail), padding and draft rows excluded; all
        of the sample's text rows when none follows the images."""
        mask = a["attention_mask"]
        text = ~visual if mask is None else mask.bool() & ~visual
        if drafts:
            text[:, text.shape[1] - drafts:] = False
        embeds = a["inputs_embeds"]
        embed = self.model.get_input_embeddings()
        for b in sorted({im.sample for im in images}):
            last = int(visual[b].nonzero()[-1, 0])
            rows = text[b].nonzero()[:, 0]
            rows = rows[rows > last] if bool((rows > last).any()) else rows
            with torch.no_grad():
                x = embeds[b, rows] if embeds is not None else embed(ids[b, rows])
            for im in images:
                if im.sample == b:
                    im.instruction = x

    @staticmethod
    def _row_maps(ids: torch.Tensor, images: list[Image]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For every row of the prompt: which image it is in (global index, -1 for text), where in
        that image's tokens, and whether it is protected."""
        image_of = torch.full_like(ids, -1)
        grid_of = torch.zeros_like(ids)
        protected = torch.zeros_like(ids, dtype=torch.bool)
        for g, im in enumerate(images):
            image_of[im.sample, im.rows] = g
            grid_of[im.sample, im.rows] = torch.arange(im.rows.numel(), device=ids.device)
            if im.protected is not None:
                protected[im.sample, im.rows] = im.protected
        return image_of, grid_of, protected

    def _images(self, out, image_mask: torch.Tensor) -> list[Image]:
        """The images of a prefill, in order: features, placeholder rows and tower signals."""
        entries = list(out.pooler_output)
        lengths = self.adapter.image_lengths(entries, image_mask)
        where = image_mask.nonzero()
        if sum(lengths) != where.shape[0]:
            raise VtcError(
                f"the prompt holds {where.shape[0]} image placeholders but the images give {sum(lengths)} "
                f"feature tokens: build the prompt with the model's processor"
            )
        feats = torch.cat([e.reshape(-1, e.shape[-1]) for e in entries]).split(lengths)
        companions = self.adapter.companions(out) or [None] * len(lengths)
        # A device hook (accelerate's offload, device_map) may hand over a copy of the encoder output
        # without the attribute: then the latest encoding's record is searched by content.
        captured = getattr(out, SIGNALS_ATTR, None) or self._signals or {}
        per_entry = [_lookup(captured, e) for e in entries]
        in_tower = self.needs_tower or self.tower is not None or self.resize is not None
        if in_tower and any(sig is None for sig in per_entry):
            raise VtcError(
                "this method reads the vision tower's attention while it runs: pass pixel_values (not "
                "precomputed image features) with vtc applied"
            )
        signals = {}
        if per_entry and per_entry[0] is not None:
            signals = {name: torch.cat([sig[name] for sig in per_entry]).split(lengths) for name in per_entry[0]}
        images, offset = [], 0
        for g, (n, f) in enumerate(zip(lengths, feats)):
            spot = where[offset: offset + n]
            offset += n
            sample = int(spot[0, 0])
            if bool((spot[:, 0] != sample).any()):
                raise VtcError("an image's placeholders span two samples of the batch: build the prompt with the "
                               "model's processor")
            mine = {name: v[g] for name, v in signals.items()}
            layout = {k.removeprefix("layout."): mine.pop(k) for k in list(mine) if k.startswith("layout.")}
            protected = layout.pop("protected", None)
            keeps = self.active_plan.keeps_for(n)
            images.append(Image(sample, spot[:, 1], f, mine, layout, protected, keeps,
                                torch.arange(n, device=f.device), companions[g]))
        return images

    def _reduce_images(self, i: int, stage: Stage, images: list[Image]) -> list[torch.Tensor]:
        """Run vision stage ``i`` on every image (images of one size together); returns what each keeps."""
        if stage.reducer in ("tome", "downsample"):  # reduced in the tower: features arrive padded
            # Merged inside the tower: the features came padded to the placeholder count (-1 sources).
            # An image keeps one placeholder row per feature, the rows of the features' lowest original
            # patches (all its rows are consecutive, so which ones is moot).
            for im in images:
                sources = im.signals["tome.index"]
                k = int((sources >= 0).sum())
                if stage.reducer == "downsample":  # whole grid rows and columns: at most the plan's count
                    im.keeps[i:] = [min(x, k) for x in im.keeps[i:]]
                elif k != im.keeps[i]:
                    raise VtcError(f"tome: the tower gave {k} features for an image, the plan {im.keeps[i]}; "
                                   f"apply tome to the model that encodes the images")
                im.feats, im.index = im.feats[:k], sources[:k].sort().values
            return [im.index for im in images]
        options = dict(stage.options)
        # own_count: the reducer sizes each image's selection itself and may drop protected tokens.
        own, pre = bool(options.get("own_count")), bool(options.get("pre"))
        groups: dict = {}
        for g, im in enumerate(images):
            k, n = im.keeps[i], im.feats.shape[0]
            if k >= n:
                continue
            shielded = not own and im.protected is not None and 0 < int(im.protected[im.index].sum()) < k
            groups.setdefault(("alone", g) if shielded or own else (n, k), []).append(g)
        for members in groups.values():
            ims = [images[g] for g in members]
            scores, metric, layout = self._vision_signals(stage, ims)
            protected = (ims[0].protected[ims[0].index]
                         if not own and len(ims) == 1 and ims[0].protected is not None else None)
            if pre and "hidden" not in ims[0].signals:
                raise VtcError(
                    f"vision stage {stage.reducer_label} merges the tower's features before the projector, and this "
                    f"{self.info.family} model does not expose them; compile the method for this model with vtc.plan"
                )
            cls = torch.stack([im.signals["cls_hidden"][0] for im in ims]) if options.get("cls") else None
            text = [im.instruction for im in ims] if self.needs_text else None
            # pre: reduce the projector's input, then project it (LLaVA's projector is per token).
            feats = torch.stack([im.signals["hidden"][im.index] if pre else im.feats for im in ims])
            sized = resized(stage, ims[0].keeps[i])
            reduced, local = reduce_vision(sized, feats, scores, metric, protected, layout, cls=cls, text=text)
            if pre:
                reduced = self.adapter.project(reduced).to(ims[0].feats.dtype)
            companions = None
            if ims[0].companions is not None:
                companions = reduce_companions(sized, torch.stack([im.companions for im in ims]), local, feats,
                                               scores, metric, protected, layout)
            for j, im in enumerate(ims):
                im.feats, im.index = reduced[j], im.index[local[j]]
                if companions is not None:
                    im.companions = companions[j]
                # What this stage kept (a reducer sizing each image itself may keep more or fewer: own_count,
                # pool's whole frames, dycoke's images); later stages keep no more than it left.
                count = im.index.numel()
                im.keeps[i:] = [count] + [min(k, count) for k in im.keeps[i + 1 :]]
        return [im.index for im in images]

    def _reduce_inputs(self, a: dict, rows: torch.Tensor, pad: torch.Tensor, ragged: bool, compact: bool):
        """Gather the sequence inputs to ``rows`` (``pad``: slots that fill a shortened sample, masked
        out); always pass a mask (gapped positions need one). Returns how far a decode step's position
        moves back per sample (None: by the rows dropped)."""
        ids = a["input_ids"]
        mask = a["attention_mask"]
        if mask is None:
            mask = torch.ones_like(ids)
        pos, shift = self.adapter.reduce_positions(a, rows, pad, ragged, compact)
        for name in self.adapter.row_inputs:
            if a.get(name) is not None:
                a[name] = ops.gather_tokens(a[name], rows).masked_fill(pad, 0)
        a["input_ids"] = ops.gather_tokens(ids, rows).masked_fill(pad, self.adapter.pad_token_id())
        a["attention_mask"] = ops.gather_tokens(mask, rows).masked_fill(pad, 0)
        a["position_ids"] = pos
        if a["inputs_embeds"] is not None:
            a["inputs_embeds"] = ops.gather_tokens(a["inputs_embeds"], rows)
        return shift

    def _vision_signals(self, stage: Stage, images: list[Image]):
        """Scores ``[I, n]``, merge metric ``[I, n, C]`` (or second scores ``[I, n]``) and token layout
        (``{name: [I, n]}``) of a vision stage for images of one size, at the tokens each still holds."""
        scores = metric = None
        if stage.scorer.kind == "random":
            gen = torch.Generator().manual_seed(stage.scorer.seed)
            n = images[0].size
            scores = torch.rand(n, generator=gen).to(images[0].feats.device).expand(len(images), n)
            scores = ops.gather_tokens(scores, torch.stack([im.index for im in images]))
        elif stage.scorer.kind == "cls_attention":
            scores = torch.stack([im.signals[f"cls{stage.scorer.layers}"][im.index] for im in images])
        elif stage.scorer.kind == "received_attention":
            scores = torch.stack([im.signals[f"recv{stage.scorer.layers}"][im.index] for im in images])
        elif stage.scorer.kind not in ("none",):
            raise VtcError(f"scorer {stage.scorer.kind!r} cannot run at a vision stage")
        if stage.metric is not None and stage.metric.kind in ("keys", "mean_keys"):
            name = f"{stage.metric.kind}{stage.metric.layers[0]}"
            metric = torch.stack([im.signals[name][im.index] for im in images])
        elif stage.metric is not None and stage.metric.kind == "cls_attention":
            metric = torch.stack([im.signals[f"cls{stage.metric.layers}"][im.index] for im in images])
        layout = {name: torch.stack([im.layout[name][im.index] for im in images]) for name in images[0].layout}
        return scores, metric, layout or None

    def _decode_step(self, a: dict) -> None:
        """A forward over a filled cache: a decode step, assisted decoding's verification of drafts,
        or the next turn of a chat continued over the returned cache.

        The prefill's state is read from the cache (it outlives the call that filled it). A vision
        reduction left the cache ``offset`` rows shorter than the positions it stands for, while
        ``generate`` picks the new ids of a continued chat by the cache's length: the surplus ids at
        the front (already in the cache, reduced) are cut here, found from the 2-D mask's width or
        the last position, both counted in original positions. So a continued chat equals a fresh
        run of the whole conversation whose image is reduced the same way (pre-LLM methods); layer
        stages keep the first turn's pruning (the cache holds only its survivors).
        """
        cache = a["cache"]
        record = cache.__dict__.get(CACHE_ATTR) or {}
        v, seq, offset = record.get("vision"), record.get("seq"), record.get("offset", 0)
        past = cache.get_seq_length()
        key = "input_ids" if a["input_ids"] is not None else "inputs_embeds"
        ids = a[key]
        if offset:
            mask, pos = a["attention_mask"], a["position_ids"]
            if mask is not None and mask.dim() == 2:
                fresh = mask.shape[1] - past - offset
            elif pos is not None and mask is None:  # no padding: the last position is the last column
                fresh = self.adapter.last_row(pos) + 1 - past - offset
            else:
                fresh = ids.shape[1]
            if 0 < fresh < ids.shape[1]:
                a[key] = ids = ids[:, -fresh:]
                if pos is not None and pos.shape[-1] > fresh:
                    a["position_ids"] = pos[..., -fresh:]
        if a["pixel_values"] is not None or (a["mm_encoder_outputs"] or {}).get("image") is not None:
            raise UnsupportedConfigurationError(
                "vtc reduces images only in a forward that starts from an empty cache: to continue a chat over "
                "the returned cache pass the new turn's ids without pixel_values (its image is in the cache); an "
                "image after a cached prefix (prefix caching) is not supported: run the whole prompt without a cache"
            )
        if offset:
            self.adapter.decode_positions(a, past, offset)
        if seq is not None:
            seq.prompt_only()
        self._step = {"state": seq}
        # Tokens after the prompt, this step's included (the LLM's prompt is the reduced one).
        prompt = seq.length if seq is not None else v["rows"].shape[1] if v is not None else 0
        new = past - prompt + ids.shape[1]
        self._step["new"] = new
        if v is None:
            return
        mask = a["attention_mask"]
        if mask is None and v["ragged"]:
            # The samples were shortened unequally: the padding slots must stay masked.
            a["attention_mask"] = torch.cat([v["valid"].long(), v["valid"].new_ones(ids.shape[0], new).long()], 1)
        elif mask is not None:
            if mask.dim() != 2:
                raise VtcError("vtc needs a 2-D attention_mask in decode steps after a vision reduction")
            prompt = ops.gather_tokens(mask, v["rows"]) * v["valid"]
            a["attention_mask"] = torch.cat([prompt, mask[:, v["length"]:]], dim=1)
        if a["position_ids"] is not None and v["compact"]:
            a["position_ids"] = self.adapter.shift_positions(a["position_ids"], v["dropped"])

    # -- the vision tower ----------------------------------------------------------------
    def _capture(self, layer: int):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            if layer in self.cls_layers:
                self._captured[layer] = ops.cls_attention(module, hidden)
            if layer in self.recv_layers:
                self._captured[f"recv{layer}"] = self.adapter.received_attention(module, hidden, kwargs)
            if layer in self.key_layers or layer in self.mean_key_layers:
                keys = self.adapter.vision_keys(module, hidden)
                if layer in self.key_layers:
                    self._captured[f"keys{layer}"] = keys
                if layer in self.mean_key_layers:  # VisionZip's metric: the keys averaged over heads
                    heads = getattr(module, "num_heads", None) or module.config.num_attention_heads
                    self._captured[f"mean_keys{layer}"] = keys.view(*keys.shape[:-1], heads, -1).mean(dim=-2)

        return hook

    def _encode(self, original, signature, args, kwargs):
        """Run the wrapped encoder. Under a ``downsample`` stage the adapter resizes the images first, so the
        tower gives fewer tokens; the features are padded to each image's placeholder count (which generate
        counts to expand them for beams, as ``tome``'s) and each one's original token is recorded."""
        if self.resize is None:
            return original(*args, **kwargs)
        arguments = signature.bind(*args, **kwargs).arguments
        arguments = {**arguments.pop("kwargs", {}), **arguments}
        call, sources, counts = self.adapter.downsample(arguments, lambda n: self.active_plan.keeps_for(n)[0])
        out = original(**call)
        out.pooler_output = self.adapter.pooler_output([padded(e, c) for e, c in zip(out.pooler_output, counts)])
        setattr(out, DOWNSAMPLED_ATTR, [padded(s[:, None], c, -1)[:, 0] for s, c in zip(sources, counts)])
        return out

    def _features_wrapper(self, original):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def get_image_features(*args, **kwargs):
            if self._encoding:  # called by the other wrapped encoder (Qwen3-VL's video encoder calls the image's)
                return original(*args, **kwargs)
            self._captured.clear()
            self._encoding = True
            try:
                out = self._encode(original, signature, args, kwargs)
            finally:
                self._encoding = False
            arguments = signature.bind(*args, **kwargs).arguments
            arguments = {**arguments.pop("kwargs", {}), **arguments}
            signals: dict[str, list[torch.Tensor]] = {}
            for layers in self.cls_sets:
                if all(i in self._captured for i in layers):
                    # A score is the [CLS] row averaged over the vision layers it reads.
                    row = torch.stack([self._captured[i] for i in layers]).mean(dim=0)
                    signals[f"cls{layers}"] = self.adapter.patch_tokens(row, arguments)
            for layers in self.recv_sets:
                if all(f"recv{i}" in self._captured for i in layers):
                    row = torch.stack([self._captured[f"recv{i}"] for i in layers]).mean(dim=0)
                    signals[f"recv{layers}"] = self.adapter.patch_tokens(row, arguments)
            for name in [f"keys{i}" for i in self.key_layers] + [f"mean_keys{i}" for i in self.mean_key_layers]:
                if name in self._captured:
                    signals[name] = self.adapter.patch_tokens(self._captured[name], arguments)
            hidden = self.adapter.pre_projector(out, arguments) if self.needs_hidden else None
            if hidden is not None:
                # The projector's input per feature token, and each token's [CLS] token alongside.
                signals["hidden"] = self.adapter.patch_tokens(hidden, arguments)
                signals["cls_hidden"] = self.adapter.patch_tokens(hidden[:, :1].expand_as(hidden), arguments)
            if self.tower is not None:
                # Each feature's lowest original patch; the features padded to the image's placeholder
                # count, which generate counts to expand them for beams (see patches/tome.py).
                sources = self.adapter.patch_tokens(self.tower.feature_sources(), arguments)
                signals["tome.index"] = [padded(s[:, None], self.info.image_tokens, -1)[:, 0] for s in sources]
                out.pooler_output = self.adapter.pooler_output(
                    [padded(e, self.info.image_tokens) for e in out.pooler_output])
            if self.resize is not None:
                signals["tome.index"] = getattr(out, DOWNSAMPLED_ATTR)
            layout = self.adapter.layout(arguments)
            entries = list(out.pooler_output)
            per_entry = [{k: v[i] for k, v in signals.items()} for i in range(len(entries))]
            for sig, extra in zip(per_entry, layout or ()):
                sig.update({f"layout.{k}": v for k, v in extra.items()})
            record = {_key(e): sig for e, sig in zip(entries, per_entry)}
            record["entries"] = list(zip(entries, per_entry))
            setattr(out, SIGNALS_ATTR, record)
            self._signals = record
            self._captured.clear()
            return out

        return get_image_features


def _key(entry: torch.Tensor) -> tuple:
    """Identifies a ``pooler_output`` entry: an entry of a batched tensor is a new view at each
    access."""
    return entry.data_ptr(), tuple(entry.shape)


def _lookup(captured: dict, entry: torch.Tensor) -> dict | None:
    """The signals recorded for ``entry``. ``generate`` may repeat entries for beams or several
    sequences per prompt: a list repeats the same tensors, a batched tensor is copied, and a
    copy is found by its content (equal features come from equal images, so equal signals)."""
    if _key(entry) in captured:
        return captured[_key(entry)]
    return next((sig for e, sig in captured.get("entries", ())
                 if e.shape == entry.shape and torch.equal(e.to(entry.device), entry)), None)


@dataclasses.dataclass
class Image:
    """One image of a prefill as the vision stages reduce it."""

    sample: int  # the batch row it is in
    rows: torch.Tensor  # its placeholder rows in that sample, in order
    feats: torch.Tensor  # its feature tokens still kept ``[k, D]``
    signals: dict  # per original token: ``cls`` scores, ``keys<L>`` merge metrics
    layout: dict  # per original token: where it is in a tiled image (``tile``, ``region``)
    protected: torch.Tensor | None  # per original token: kept at every stage
    keeps: list[int]  # what each stage of the plan keeps of it
    index: torch.Tensor  # which original tokens ``feats`` stand for
    # Per-token tensors reduced exactly as ``feats`` (the adapter's companions: Qwen3-VL's DeepStack), or None.
    companions: torch.Tensor | None = None
    # The input embeddings of the instruction it is asked about ``[M, D]`` (read by ``cdpruner``), or None.
    instruction: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.rows.numel()
