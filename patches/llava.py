"""Adapter for LLaVA-1.5-style models (``LlavaForConditionalGeneration``): a CLIP-like tower,
a projector, and a Llama/Qwen2/Mistral-style language model."""

from __future__ import annotations

import torch

from vtc import ops
from vtc.errors import MethodNotApplicableError
from vtc.plan import ModelInfo
from vtc.registry import register_adapter

from .adapter import Adapter


def feature_layer_index(feature_layer: int, num_layers: int) -> int:
    """0-based index of the vision layer whose output ``hidden_states[feature_layer]`` is.

    ``hidden_states`` holds the embeddings then each layer's output, so entry ``i`` is the
    output of layer ``i - 1``.

    Example:
        >>> feature_layer_index(-2, 24)
        22
    """
    entry = feature_layer % (num_layers + 1)
    return entry - 1


@register_adapter
class LlavaAdapter(Adapter):
    """LLaVA-1.5 family: each image is one run of ``image_token_id`` placeholders."""

    family = "llava"
    class_names = ("LlavaForConditionalGeneration",)
    model_types = ("llava",)

    def _tower(self):
        return self.base().vision_tower

    def vision_attention(self, layer: int):
        return self._tower().encoder.layers[layer].self_attn

    def vision_blocks(self):
        """The tower's encoder layers, for merging inside them (``tome``): only when the features
        are one layer's patch tokens, so that merged tokens can be the features."""
        cfg = self.model.config
        if not isinstance(cfg.vision_feature_layer, int) or cfg.vision_feature_select_strategy != "default":
            raise MethodNotApplicableError(
                f"tome merges inside the vision tower, so the features must be one layer's patch tokens; this model "
                f"reads layer(s) {cfg.vision_feature_layer} with strategy {cfg.vision_feature_select_strategy!r}: "
                f"use merge (bipartite merging after the tower)"
            )
        return self._tower().encoder.layers

    def _feature_layer(self) -> int:
        layer = self.model.config.vision_feature_layer
        if not isinstance(layer, int):
            layer = max(layer, key=lambda i: i % (self._tower().config.num_hidden_layers + 1))
        return layer

    def info(self) -> ModelInfo:
        cfg = self.model.config
        vcfg = cfg.vision_config
        patches = (vcfg.image_size // vcfg.patch_size) ** 2
        strategy = cfg.vision_feature_select_strategy
        return ModelInfo(
            family=self.family,
            image_tokens=patches + (1 if strategy == "full" else 0),
            vision_layers=vcfg.num_hidden_layers,
            vision_feature_layer=feature_layer_index(self._feature_layer(), vcfg.num_hidden_layers),
            has_cls=True,
            resizable=self._resizable(),
            **self.text_sizes(),
        )

    def vision_hidden_size(self) -> int:
        return self.model.config.vision_config.hidden_size

    def _resizable(self) -> bool:
        """Whether the tower can encode a smaller image whose patch tokens are the features (``downsample``)."""
        cfg = self.model.config
        return isinstance(cfg.vision_feature_layer, int) and cfg.vision_feature_select_strategy == "default"

    def downsample(self, arguments: dict, keep_for) -> tuple[dict, list[torch.Tensor], list[int]]:
        """LLaVA-1.5's tower takes one fixed size (336px): the processed image is resized (bicubic) to the
        patch grid :func:`vtc.ops.downsampled_grid` gives for the budget, and the tower interpolates its
        position embeddings to that grid (``interpolate_pos_encoding``), so it gives that many tokens."""
        if self.feature_strategy(arguments) != "default":
            raise MethodNotApplicableError(
                "downsample needs the features to be the tower's patch tokens (vision_feature_select_strategy "
                "'default'); this model also feeds the [CLS] token: use pool")
        vcfg = self.model.config.vision_config
        side, patch = vcfg.image_size // vcfg.patch_size, vcfg.patch_size
        rows, cols = ops.downsampled_grid(side, side, keep_for(side * side))
        pixels = arguments["pixel_values"]
        call = {**arguments, "pixel_values": ops.resize_images(pixels, rows * patch, cols * patch),
                "interpolate_pos_encoding": True}
        centres = ops.grid_centres(side, side, rows, cols, device=pixels.device)
        return call, [centres] * pixels.shape[0], [side * side] * pixels.shape[0]

    def patch_tokens(self, per_token: torch.Tensor, arguments: dict) -> list[torch.Tensor]:
        return list(self.without_cls(per_token, arguments))
