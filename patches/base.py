"""What every adapter shares: reversible instance patching and the execution of a plan.

An adapter subclass knows one model family (where the vision tower, the image
placeholders and the decoder layers are); :class:`Installation` executes any plan on it:

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
from typing import Any, ClassVar

import torch
from torch import nn

from vtc import ops
from vtc.errors import UnsupportedConfigurationError, VtcError
from vtc.flops import Stats, make_stats
from vtc.plan import ModelInfo, Plan, Stage
from vtc.reduce import reduce_vision

from .decoder import LayerStages, SequenceState

_MISSING = object()
SIGNALS_ATTR = "vtc_signals"  # set on the vision output: {id(feature tensor): {"cls": [N], "keysL": [N, C]}}


class Adapter:
    """Knows one model family. Subclasses fill in the family-specific lookups.

    ``class_names`` and ``model_types`` say which models it serves; the lookups return
    the loaded model's own modules.
    """

    family: ClassVar[str] = ""
    class_names: ClassVar[tuple[str, ...]] = ()
    model_types: ClassVar[tuple[str, ...]] = ()
    # Parameters of the base forward the wrapper reads or rewrites.
    forward_params: ClassVar[tuple[str, ...]] = (
        "input_ids", "pixel_values", "attention_mask", "position_ids", "cache", "inputs_embeds",
        "mm_encoder_outputs",
    )

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return type(model).__name__ in cls.class_names or model_type in cls.model_types

    # -- family-specific lookups -------------------------------------------------------
    def base(self) -> nn.Module:
        """The module whose ``forward`` merges image features into the sequence."""
        raise NotImplementedError

    def decoder_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def rotary(self) -> nn.Module:
        raise NotImplementedError

    def vision_attention(self, layer: int) -> nn.Module:
        raise NotImplementedError

    def info(self) -> ModelInfo:
        raise NotImplementedError

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def encode_images(self, arguments: dict) -> Any:
        """Run the vision tower for the base forward's ``arguments``; returns its output object."""
        raise NotImplementedError

    def patch_tokens(self, per_token: torch.Tensor, arguments: dict) -> torch.Tensor:
        """Map a per-token tower quantity ``[images, tower tokens, ...]`` (a [CLS] attention row,
        keys) to one entry per feature token the LLM receives."""
        raise NotImplementedError

    def vision_hidden_size(self) -> int:
        return 0


class Installation:
    """A plan installed on one model instance; :meth:`remove` undoes it exactly."""

    def __init__(self, adapter: Adapter, plan: Plan) -> None:
        self.adapter, self.plan = adapter, plan
        self.info = adapter.info()
        self.base = adapter.base()
        self._saved: list[tuple[nn.Module, str, Any]] = []
        self._handles: list = []
        self._captured: dict[int, torch.Tensor] = {}
        self._vision: dict | None = None  # the prefill's vision reduction, for decode steps
        self._seq: SequenceState | None = None  # the prefill's sequence state, for layer stages
        self._step: dict | None = None  # per decode step scratch, None at prefill
        self.last_stats: Stats | None = None
        # A stage that keeps every token it receives is skipped: no scoring, no gather.
        reaching = [plan.image_tokens, *(s.keep for s in plan.stages)]
        active = tuple(s for s, n in zip(plan.stages, reaching) if s.keep < n)
        # What actually runs, for the accounting (a skipped stage costs no scoring).
        self.active_plan = dataclasses.replace(plan, stages=active)
        self.vision_stages = tuple(s for s in active if s.layer is None)
        self.layer_stages = LayerStages(
            adapter.decoder_layers(), adapter.rotary(), tuple(s for s in active if s.layer is not None),
            state=lambda: self._seq, decoding=lambda: self._step,
        )
        self.cls_layers = sorted({i for s in self.vision_stages if s.scorer.kind == "cls_attention"
                                  for i in s.scorer.layers})
        self.key_layers = sorted({s.metric.layers[0] for s in self.vision_stages
                                  if s.metric is not None and s.metric.kind == "keys"})

    # -- install / remove --------------------------------------------------------------
    def install(self) -> None:
        try:
            self._wrap(self.base, "forward", self._forward_wrapper)
            if self.cls_layers or self.key_layers:
                self._wrap(self.base, "get_image_features", self._features_wrapper)
                for layer in sorted({*self.cls_layers, *self.key_layers}):
                    module = self.adapter.vision_attention(layer)
                    self._handles.append(module.register_forward_pre_hook(self._capture(layer), with_kwargs=True))
            self.layer_stages.install()
        except Exception:
            self.remove()
            raise

    def remove(self) -> None:
        self.layer_stages.remove()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module, name, previous in reversed(self._saved):
            if previous is _MISSING:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = previous
        self._saved.clear()
        self._vision = self._seq = self._step = None

    def _wrap(self, module: nn.Module, name: str, make) -> None:
        original = getattr(module, name)
        wrapper = make(original)
        self._saved.append((module, name, module.__dict__.get(name, _MISSING)))
        # An instance attribute shadows the class's method for this object only.
        module.__dict__[name] = wrapper

    # -- the base forward --------------------------------------------------------------
    def _forward_wrapper(self, original):
        sig = inspect.signature(original)
        missing = [p for p in self.adapter.forward_params if p not in sig.parameters]
        if missing:
            raise UnsupportedConfigurationError(
                f"{type(self.base).__name__}.forward no longer takes {missing}: this transformers version "
                f"changed the interface vtc wraps; install a supported version (vtc.MIN_TRANSFORMERS)"
            )

        @functools.wraps(original)
        def forward(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            self._before_forward(bound.arguments)
            return original(*bound.args, **bound.kwargs)

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
        ids = a["input_ids"]
        has_images = a["pixel_values"] is not None or (a["mm_encoder_outputs"] or {}).get("image") is not None
        if ids is None:
            if has_images:
                raise VtcError("vtc locates image tokens by input_ids: pass input_ids, not inputs_embeds")
            return
        image_mask = ids == self.adapter.image_token_id
        if not has_images or not bool(image_mask.any()):
            self.last_stats = make_stats(self.info, self.active_plan, ids.shape[1], 0)
            return
        self._prefill(a, ids, image_mask)

    def _prefill(self, a: dict, ids: torch.Tensor, image_mask: torch.Tensor) -> None:
        mm = dict(a["mm_encoder_outputs"] or {})
        out = mm.get("image")
        if out is None:
            out = self.adapter.encode_images(a)
        feats = list(out.pooler_output)
        bsz, n = ids.shape[0], self.info.image_tokens
        counts = image_mask.sum(dim=1)
        if any(f.shape[0] != n for f in feats) or bool((counts != counts[0]).any()) or int(counts[0]) % n:
            raise VtcError(
                f"vtc needs every sample of a batch to hold the same number of images of {n} tokens; got "
                f"placeholder counts {counts.tolist()}; batch such prompts separately"
            )
        per_sample = int(counts[0]) // n
        placeholders = image_mask.nonzero()[:, 1].view(bsz, per_sample, n)
        feats_t = torch.stack(feats)  # [B * per_sample, n, D]
        index = torch.arange(n, device=feats_t.device).expand(feats_t.shape[0], n)
        kept = {}
        for stage in self.vision_stages:
            scores, metric = self._vision_signals(stage, out, feats)
            scores = None if scores is None else ops.gather_tokens(scores, index)
            metric = None if metric is None else ops.gather_tokens(metric, index)
            feats_t, local = reduce_vision(stage, feats_t, scores, metric)
            index = ops.gather_tokens(index, local)
            kept[stage.where] = index.view(bsz, per_sample, -1)
        text_rows = (~image_mask).nonzero()[:, 1].view(bsz, -1)
        image_rows = placeholders.gather(2, index.view(bsz, per_sample, -1).to(placeholders.device))
        rows = torch.cat([text_rows, image_rows.view(bsz, -1)], dim=1).sort(dim=1).values
        total = ids.shape[1]
        compact = any(s.positions == "compact" for s in self.vision_stages)
        if self.vision_stages:
            self._reduce_inputs(a, rows, compact)
            out = copy.copy(out)
            out.pooler_output = list(feats_t.unbind(0))
            self._vision = {"rows": rows, "length": total, "dropped": total - rows.shape[1], "compact": compact}
        # Hand over the features computed here, so the original forward does not encode again.
        mm["image"] = out
        a["mm_encoder_outputs"], a["pixel_values"] = mm, None
        new_ids = a["input_ids"]
        if self.layer_stages.stages:
            is_image = new_ids == self.adapter.image_token_id
            k = int(is_image[0].sum()) // per_sample
            order = is_image.cumsum(dim=1) - 1
            image_of = torch.where(is_image, order // k, -1)
            grid_of = torch.where(is_image, index.reshape(bsz, -1).gather(1, order.clamp_min(0)), -1)
            mask = a["attention_mask"]
            self._seq = SequenceState(
                rows=torch.arange(new_ids.shape[1], device=new_ids.device).expand(bsz, -1),
                image_of=image_of,
                key_valid=torch.ones_like(new_ids, dtype=torch.bool) if mask is None else mask.bool(),
                length=new_ids.shape[1],
                num_images=per_sample,
                grid_of=grid_of,
                kept=kept,
            )
            kept = self._seq.kept  # layer stages add their survivors to the same record
        text = total - per_sample * n
        self.last_stats = make_stats(self.info, self.active_plan, text, per_sample, kept,
                                     self.adapter.vision_hidden_size())

    def _reduce_inputs(self, a: dict, rows: torch.Tensor, compact: bool) -> None:
        """Gather the sequence inputs to ``rows``; always pass a mask (gapped positions need one)."""
        ids = a["input_ids"]
        mask = a["attention_mask"]
        if mask is None:
            mask = torch.ones_like(ids)
        pos = a["position_ids"]
        if pos is None and not compact:
            pos = torch.arange(ids.shape[1], device=ids.device)[None]
        if pos is not None:
            pos = ops.gather_tokens(pos, rows)
            if compact:
                pos = pos - (rows - torch.arange(rows.shape[1], device=rows.device))
        a["input_ids"] = ops.gather_tokens(ids, rows)
        a["attention_mask"] = ops.gather_tokens(mask, rows)
        a["position_ids"] = pos
        if a["inputs_embeds"] is not None:
            a["inputs_embeds"] = ops.gather_tokens(a["inputs_embeds"], rows)

    def _vision_signals(self, stage: Stage, out, feats: list[torch.Tensor]):
        """Scores ``[I, N]`` and merge metric ``[I, N, C]`` of a vision stage, in grid order."""
        n = self.info.image_tokens
        captured = getattr(out, SIGNALS_ATTR, None) or {}
        needs_tower = stage.scorer.kind == "cls_attention" or (stage.metric and stage.metric.kind == "keys")
        if needs_tower and any(id(f) not in captured for f in feats):
            raise VtcError(
                "this method reads the vision tower's attention while it runs: pass pixel_values (not "
                "precomputed image features) with vtc applied"
            )
        scores = metric = None
        if stage.scorer.kind == "random":
            gen = torch.Generator().manual_seed(stage.scorer.seed)
            scores = torch.rand(n, generator=gen).to(feats[0].device).expand(len(feats), n)
        elif stage.scorer.kind == "cls_attention":
            scores = torch.stack([captured[id(f)]["cls"] for f in feats])
        elif stage.scorer.kind not in ("none",):
            raise VtcError(f"scorer {stage.scorer.kind!r} cannot run at a vision stage")
        if stage.metric is not None and stage.metric.kind == "keys":
            metric = torch.stack([captured[id(f)][f"keys{stage.metric.layers[0]}"] for f in feats])
        return scores, metric

    def _decode_step(self, a: dict) -> None:
        if a["pixel_values"] is not None or (a["mm_encoder_outputs"] or {}).get("image") is not None:
            raise VtcError("vtc reduces images at prefill only: a step with a cache cannot add an image")
        self._step = {"state": self._seq}
        v = self._vision
        if v is None:
            return
        mask = a["attention_mask"]
        if mask is not None:
            if mask.dim() != 2:
                raise VtcError("vtc needs a 2-D attention_mask in decode steps after a vision reduction")
            new = torch.arange(v["length"], mask.shape[1], device=mask.device).expand(mask.shape[0], -1)
            a["attention_mask"] = ops.gather_tokens(mask, torch.cat([v["rows"], new], dim=1))
        if a["position_ids"] is not None and v["compact"]:
            a["position_ids"] = a["position_ids"] - v["dropped"]

    # -- the vision tower ----------------------------------------------------------------
    def _capture(self, layer: int):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            if layer in self.cls_layers:
                self._captured[layer] = ops.cls_attention(module, hidden)
            if layer in self.key_layers:
                self._captured[f"keys{layer}"] = module.k_proj(hidden)

        return hook

    def _features_wrapper(self, original):
        @functools.wraps(original)
        def get_image_features(*args, **kwargs):
            self._captured.clear()
            out = original(*args, **kwargs)
            if not self._captured:
                return out
            signals: dict[str, torch.Tensor] = {}
            if self.cls_layers:
                # The score is the [CLS] row averaged over the vision layers the plan reads.
                row = torch.stack([self._captured[i] for i in self.cls_layers]).mean(dim=0)
                signals["cls"] = self.adapter.patch_tokens(row, kwargs)
            for layer in self.key_layers:
                signals[f"keys{layer}"] = self.adapter.patch_tokens(self._captured[f"keys{layer}"], kwargs)
            feats = list(out.pooler_output)
            per_image = [{k: v[i] for k, v in signals.items()} for i in range(len(feats))]
            setattr(out, SIGNALS_ATTR, {id(f): sig for f, sig in zip(feats, per_image)})
            self._captured.clear()
            return out

        return get_image_features
