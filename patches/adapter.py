"""The interface of a model-family adapter: where a family keeps its vision tower, image
placeholders and decoder layers, and how its per-token quantities line up with the features
the LLM receives. One file per family in ``patches/`` subclasses it; :mod:`vtc.patches.base`
executes any plan through it.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from torch import nn

from vtc import ops
from vtc.errors import MethodNotApplicableError
from vtc.plan import ModelInfo


class Adapter:
    """Knows one model family. Subclasses fill in the family-specific lookups.

    ``class_names`` and ``model_types`` say which models it serves; the lookups return
    the loaded model's own modules.
    """

    family: ClassVar[str] = ""
    class_names: ClassVar[tuple[str, ...]] = ()
    model_types: ClassVar[tuple[str, ...]] = ()
    # Whether :meth:`layout` gives per-token facts (then image encoding is always wrapped).
    has_layout: ClassVar[bool] = False
    # Parameters of the base forward the wrapper reads or rewrites.
    forward_params: ClassVar[tuple[str, ...]] = (
        "input_ids", "pixel_values", "attention_mask", "position_ids", "cache", "inputs_embeds",
        "mm_encoder_outputs",
    )
    # Other per-row inputs of the base forward (``[B, T]``), gathered with the rows a vision stage keeps.
    row_inputs: ClassVar[tuple[str, ...]] = ()
    # The positions policy of every stage when a method is not given ``positions`` (None: the method's).
    default_positions: ClassVar[str | None] = None

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return type(model).__name__ in cls.class_names or model_type in cls.model_types

    # -- family-specific lookups (defaults: transformers 5.x's ``*ForConditionalGeneration``
    # layout, ``model.model`` holding ``vision_tower`` and ``language_model``) ------------
    def base(self) -> nn.Module:
        """The module whose ``forward`` merges image features into the sequence."""
        return self.model.model

    def decoder_layers(self) -> nn.ModuleList:
        return self.base().language_model.layers

    def rotary(self) -> nn.Module:
        return self.base().language_model.rotary_emb

    def final_norm(self) -> nn.Module | None:
        """The language model's final norm (DART compares hidden states after it)."""
        return getattr(self.base().language_model, "norm", None)

    def vision_attention(self, layer: int) -> nn.Module:
        raise NotImplementedError

    def vision_keys(self, module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The attention keys (before any RoPE) of a vision attention module for its input ``hidden``."""
        return module.k_proj(hidden)

    def received_attention(self, module: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The attention each tower token receives, averaged over queries and heads, computed from a vision
        attention module's input (``hidden`` and its keyword arguments), one value per tower token."""
        raise NotImplementedError(f"{self.family} has no received-attention signal")

    def check_plan(self, plan) -> None:
        """Refuse, with :class:`~vtc.errors.UnsupportedConfigurationError`, a plan this family cannot run."""

    def prefill_positions(self, arguments: dict) -> None:
        """Fill in the base forward's ``position_ids`` the model would compute from the original prompt,
        where it computes them itself from more than row order (Qwen's 3-D M-RoPE); before rows are dropped."""

    def reduce_positions(self, arguments: dict, rows: torch.Tensor, pad: torch.Tensor, ragged: bool,
                         compact: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The base forward's ``position_ids`` gathered to the kept ``rows`` (``pad``: padding slots),
        re-indexed under ``compact``; and by how much a decode step's position moves back per sample
        ``[B, 1]`` (None: by the rows dropped)."""
        pos = arguments["position_ids"]
        if pos is None and (ragged or not compact):
            pos = torch.arange(int(rows.max()) + 1, device=rows.device)[None]  # original row order
        if pos is not None:
            pos = ops.gather_tokens(pos, rows)
            if compact:
                # Move each row back by the image rows dropped before it in its sample.
                rank = torch.arange(rows.shape[1], device=rows.device) - pad.sum(dim=1, keepdim=True)
                pos = pos - (rows - rank)
        return pos, None

    def last_row(self, pos: torch.Tensor) -> int:
        """The original row index of the last token, from a step's ``position_ids`` (when no mask tells)."""
        return int(pos.reshape(-1, pos.shape[-1])[:, -1].max())

    def shift_positions(self, pos: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """A decode step's ``position_ids`` moved back by ``shift`` ``[B, 1]`` (compacted prompt positions)."""
        return pos - shift

    # The placeholder of a second visual modality reduced like images (Qwen's video), else None.
    video_token_id: int | None = None

    def encode_videos(self, arguments: dict) -> Any:
        """The video encoder's output (one ``pooler_output`` entry per video), for a prompt with video rows."""
        raise NotImplementedError

    def encode_others(self, arguments: dict) -> None:
        """Once the images' encoder output is handed to the base forward (``mm_encoder_outputs``), encode
        the other modalities still given as pixels (video) into it too: the forward refuses both."""
        if arguments.get("pixel_values_videos") is None:
            return
        mm = arguments["mm_encoder_outputs"]
        if mm.get("video") is None:
            mm["video"] = self.encode_videos(arguments)
        arguments["pixel_values_videos"] = None

    def decode_positions(self, arguments: dict, past: int, offset: int) -> None:
        """Fill in a decode step's ``position_ids`` where the model would number it by the cache's length,
        which a vision reduction made ``offset`` rows shorter than the positions it stands for."""

    def info(self) -> ModelInfo:
        raise NotImplementedError

    def text_sizes(self) -> dict:
        """The language model's sizes, as :class:`~vtc.plan.ModelInfo` fields."""
        t = getattr(self.model.config, "text_config", self.model.config)
        return {
            "num_layers": t.num_hidden_layers,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_heads": t.num_attention_heads,
            "num_kv_heads": getattr(t, "num_key_value_heads", None) or t.num_attention_heads,
            "head_dim": getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads,
        }

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def pad_token_id(self) -> int:
        """A token id that is not the image placeholder, for padding a shortened batch."""
        pad = getattr(getattr(self.model.config, "text_config", self.model.config), "pad_token_id", None)
        return pad if pad is not None and pad != self.image_token_id else int(self.image_token_id == 0)

    def attention_implementation(self) -> str:
        cfg = getattr(self.model.config, "text_config", self.model.config)
        return getattr(cfg, "_attn_implementation", None) or "sdpa"

    def encode_images(self, arguments: dict) -> Any:
        """Run the vision tower for the base forward's ``arguments``, as that forward does when
        given ``pixel_values``; returns the encoder's output object."""
        encode = self.base().get_image_features
        takes = inspect.signature(encode).parameters
        names = ("pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy")
        return encode(**{k: arguments[k] for k in names if k in takes and k in arguments},
                      **{**arguments.get("kwargs", {}), "return_dict": True})

    def patch_tokens(self, per_token: torch.Tensor, arguments: dict) -> list[torch.Tensor]:
        """Map a per-token tower quantity ``[tower images, tower tokens, ...]`` (a [CLS] attention
        row, keys) to the feature entries the LLM receives (one per ``pooler_output`` entry),
        each with one value per feature token."""
        raise NotImplementedError

    def feature_strategy(self, arguments: dict) -> str:
        """The encoder call's ``vision_feature_select_strategy``, or the config's."""
        return arguments.get("vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy

    def without_cls(self, per_token: torch.Tensor, arguments: dict) -> torch.Tensor:
        """The tower tokens that become features: ``"default"`` drops the [CLS] token, ``"full"``
        keeps it."""
        return per_token[:, 1:] if self.feature_strategy(arguments) == "default" else per_token

    def layout(self, arguments: dict) -> list[dict[str, torch.Tensor]] | None:
        """Per ``pooler_output`` entry, structural facts about its tokens that plans use (e.g.
        ``protected``: tokens kept at every stage), computed from the encoder's ``arguments``;
        None if the family has none."""
        return None

    def image_lengths(self, entries: list[torch.Tensor], image_mask: torch.Tensor) -> list[int]:
        """Tokens of each image, in order, given the encoder's ``pooler_output`` entries (one per
        image unless a family overrides this) and the placeholder mask."""
        return [e.shape[0] for e in entries]

    def pooler_output(self, feats: list[torch.Tensor]) -> Any:
        """The ``pooler_output`` the model's forward expects, from reduced per-image features."""
        return feats

    def video_pooler_output(self, feats: list[torch.Tensor]) -> Any:
        """The video encoder's ``pooler_output`` from reduced per-video features (default: as images')."""
        return self.pooler_output(feats)

    def vision_hidden_size(self) -> int:
        return 0

    def companions(self, out: Any) -> list[torch.Tensor] | None:
        """Per ``pooler_output`` entry, per-token tensors ``[tokens, C]`` of the encoder output ``out`` that the
        model uses alongside the features (Qwen3-VL's DeepStack features), which vision stages must reduce
        exactly as the features; None if the family has none."""
        return None

    def set_companions(self, out: Any, companions: list[torch.Tensor | None]) -> None:
        """Write reduced :meth:`companions` (one per entry) back into the encoder output ``out``."""

    def llm_wrappers(self, state) -> list[tuple[nn.Module, str, Any]]:
        """``(module, method name, make)`` for each method of the language model, besides its decoder layers,
        that reads per-row inputs and must follow the rows layer stages keep (Qwen3-VL's DeepStack);
        ``make(original)`` returns the replacement, ``state()`` the prefill's
        :class:`~vtc.patches.decoder.SequenceState` (or None). Installed on the instance, restored by remove."""
        return []

    def pre_projector(self, out: Any, arguments: dict) -> torch.Tensor | None:
        """The tower's features the projector reads, ``[tower images, tower tokens, C]`` with the
        [CLS] token first, from the encoder's output ``out``; None where the family's projector does
        not read tower tokens one by one (then methods merge projected features instead).
        Default: ``hidden_states[vision_feature_layer]`` for a single feature layer."""
        layer = arguments.get("vision_feature_layer")
        layer = self.model.config.vision_feature_layer if layer is None else layer
        states = getattr(out, "hidden_states", None)
        return states[layer] if isinstance(layer, int) and states is not None else None

    def downsample(self, arguments: dict, keep_for) -> tuple[dict, list[torch.Tensor], list[int]]:
        """For a ``downsample`` stage: the image encoder's ``arguments`` with each image resized so that the
        tower itself gives at most ``keep_for(n)`` tokens for an image of ``n``; per encoder output entry, the
        original token at the centre of each new token (ascending); and each entry's original token count.
        Families whose tower takes fixed-size tiles chosen by the processor refuse."""
        raise MethodNotApplicableError(
            f"downsample resizes an image so that the vision tower gives fewer tokens; {self.family} cuts images "
            f"into fixed-size tiles its processor chooses: give the processor a smaller image or fewer tiles, or "
            f"use a method that reduces after the tower (pool, merge, divprune)"
        )

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The model's projector applied to tower features ``[..., C]`` (what :meth:`pre_projector`
        returns, reduced)."""
        return self.base().multi_modal_projector(x)
