"""ToMe inside a CLIP-style vision tower: each encoder layer of this model instance gets a
forward that merges tokens between attention and MLP, as the official timm patch does
(facebookresearch/ToMe ``tome/patch/timm.py``, ``ToMeBlock.forward``, lines 34-56, and
``ToMeAttention.forward``, lines 66-96).

Per tower call: the first block starts every token at size 1; block ``i`` runs attention with
``log(size)`` added to the logits (an additive float mask, which sdpa and eager both take),
adds the residual, merges ``r_i`` tokens by :func:`vtc.ops.tome_matching` on its keys averaged
over heads (size-weighted, :func:`vtc.ops.merge_weighted`), then runs the MLP on the merged
tokens. Each token also carries the lowest original index among those it stands for, so the
features can be matched to placeholders. Only the layer instances are patched (their
``forward`` shadowed by an instance attribute, a hook on ``k_proj``); :meth:`TowerMerge.remove`
restores them.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from vtc import ops
from vtc.errors import MethodNotApplicableError, UnsupportedConfigurationError

from .local import PerThread

_MISSING = object()
# The encoder layer forward this patch replaces, and the submodules it calls.
LAYER_PARAMS = ("hidden_states", "attention_mask", "kwargs")
LAYER_PARTS = ("layer_norm1", "self_attn", "layer_norm2", "mlp")


class TowerMerge:
    """ToMe on the encoder ``layers`` of one vision tower, ``schedule[i]`` tokens merged in layer
    ``i`` (capped at half the unprotected tokens), the first token protected if ``class_token``,
    proportional attention if ``prop_attn``.

    After a tower call, :meth:`sources` gives each token of a layer's output the lowest original
    token index it stands for.

    Example:
        >>> from vtc.testing import tiny_llava
        >>> tower = tiny_llava().model.vision_tower
        >>> merge = TowerMerge(tower.encoder.layers, (4, 3, 3, 0))
        >>> merge.install()
        >>> tower(torch.zeros(1, 3, 56, 56), output_hidden_states=True).hidden_states[3].shape
        torch.Size([1, 7, 32])
        >>> merge.sources(2).tolist()
        [[0, 7, 3, 10, 14, 1, 4]]
        >>> merge.remove()
    """

    # Per-call state (one value per thread: a patched instance may serve concurrent calls).
    _keys = PerThread()
    _size = PerThread()
    _source = PerThread()
    _sources = PerThread(list)

    def __init__(self, layers: nn.ModuleList, schedule: tuple[int, ...], class_token: bool = True,
                 prop_attn: bool = True) -> None:
        if len(schedule) != len(layers):
            raise ValueError(f"the schedule gives {len(schedule)} counts for {len(layers)} vision layers")
        self.layers, self.schedule = layers, tuple(schedule)
        self.class_token, self.prop_attn = class_token, prop_attn
        self._saved: list[tuple[nn.Module, object]] = []
        self._handles: list = []
        self.feature_layer = len(layers) - 1  # whose output the features are (set by the installer)

    def check(self) -> None:
        """Refuse layers this patch does not know, before anything is changed."""
        for i, layer in enumerate(self.layers):
            missing = [p for p in LAYER_PARTS if not hasattr(layer, p)]
            params = list(inspect.signature(layer.forward).parameters)
            if missing or params != list(LAYER_PARAMS) or not hasattr(layer.self_attn, "k_proj"):
                raise UnsupportedConfigurationError(
                    f"tome patches CLIP-style encoder layers ({', '.join(LAYER_PARTS)}; forward{LAYER_PARAMS}); "
                    f"vision layer {i} ({type(layer).__name__}) has forward{tuple(params)}"
                    + (f" and lacks {missing}" if missing else "")
                    + ": this transformers version changed the layer; install a supported one (vtc.MIN_TRANSFORMERS)"
                )
        backend = getattr(self.layers[0].self_attn.config, "_attn_implementation", None) or "eager"
        if self.prop_attn and backend not in ("eager", "sdpa"):
            raise MethodNotApplicableError(
                f"tome's proportional attention adds log(size) to the vision tower's attention logits, which "
                f"{backend!r} attention cannot take; load the vision tower with attn_implementation 'sdpa' or "
                f"'eager', or pass prop_attn=False"
            )

    def install(self) -> None:
        self.check()
        try:
            for i, layer in enumerate(self.layers):
                self._saved.append((layer, layer.__dict__.get("forward", _MISSING)))
                layer.__dict__["forward"] = self._forward(i, layer)
                self._handles.append(layer.self_attn.k_proj.register_forward_hook(self._keep_keys))
        except Exception:
            self.remove()
            raise

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for layer, previous in reversed(self._saved):
            if previous is _MISSING:
                layer.__dict__.pop("forward", None)
            else:
                layer.__dict__["forward"] = previous
        self._saved.clear()
        self._keys = self._size = self._source = None
        self._sources = []

    def feature_sources(self) -> torch.Tensor:
        """:meth:`sources` of the feature layer, counted in patches (the [CLS] token is -1)."""
        return self._sources[self.feature_layer] - int(self.class_token)

    def sources(self, layer: int) -> torch.Tensor:
        """``[tower images, tokens]``: for each token of vision layer ``layer``'s output in the last
        tower call, the lowest original token index among those it stands for."""
        return self._sources[layer]

    def _keep_keys(self, module, args, output) -> None:
        self._keys = output

    def _forward(self, index: int, layer: nn.Module):
        attn = layer.self_attn
        heads = getattr(attn, "num_heads", None) or attn.config.num_attention_heads

        def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
            x = hidden_states
            if index == 0:  # a new tower call: every token stands for itself
                self._size, self._sources = None, []
                self._source = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)[..., None]
            mask = attention_mask
            if self.prop_attn and self._size is not None:
                bias = self._size.log().to(x.dtype)[:, None, None, :, 0]  # [B, 1, 1, N]: log size per key
                mask = bias if mask is None else mask + bias
            self._keys = None
            out, _ = attn(hidden_states=layer.layer_norm1(x), attention_mask=mask, **kwargs)
            x = x + out
            r = self.schedule[index]
            if r > 0:
                keys = self._keys
                metric = keys.view(*keys.shape[:-1], heads, -1).mean(dim=-2)  # keys averaged over heads
                merge = ops.tome_matching(metric, r, self.class_token)
                x, self._size = ops.merge_weighted(merge, x, self._size)
                self._source = merge(self._source, mode="amin")
            self._keys = None
            self._sources.append(self._source[..., 0])
            return x + layer.mlp(layer.layer_norm2(x))

        return forward


def tower_merge(adapter, stages) -> TowerMerge | None:
    """The tower patch a plan's ``tome`` stage asks for (None without one). The adapter gives the
    encoder layers (``vision_blocks``: LLaVA-1.5-style models); the stage, ``r`` per layer and
    ``prop_attn``.

    Example:
        >>> from vtc.testing import tiny_llava
        >>> from vtc.registry import get_adapter
        >>> adapter = get_adapter(tiny_llava())
        >>> plan = vtc.plan(adapter.model, "tome", budget=6)
        >>> tower_merge(adapter, plan.stages).schedule
        (4, 3, 3, 0)
    """
    stage = next((s for s in stages if s.reducer == "tome"), None)
    if stage is None:
        return None
    blocks = getattr(adapter, "vision_blocks", None)
    if blocks is None:
        raise MethodNotApplicableError(
            f"tome merges inside the vision tower; vtc does this for LLaVA-1.5-style models, not {adapter.family}: "
            f"use merge (bipartite merging after the tower)"
        )
    options = dict(stage.options)
    info = adapter.info()
    merge = TowerMerge(blocks(), options["r"], class_token=info.has_cls, prop_attn=bool(options.get("prop_attn", 1)))
    merge.feature_layer = info.vision_feature_layer
    return merge


def padded(x: torch.Tensor, n: int, value: float = 0) -> torch.Tensor:
    """``x`` ``[k, ...]`` followed by ``n - k`` rows of ``value``.

    Merged inside the tower, an image has fewer features than the prompt has placeholders for it;
    ``generate`` splits the encoder's output among samples by counting placeholders (to expand it
    for beams), so the features are handed on padded to the placeholder count, and the vision
    stage cuts the padding off before the LLM sees them.

    Example:
        >>> padded(torch.ones(2, 3), 4)[:, 0].tolist()
        [1.0, 1.0, 0.0, 0.0]
    """
    return torch.cat([x, x.new_full((n - x.shape[0], *x.shape[1:]), value)])
