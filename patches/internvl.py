"""Adapter for InternVL 2/2.5/3 in the Hugging Face format (``InternVLForConditionalGeneration``):
an InternViT tower with a [CLS] token, 448px tiles (the thumbnail last), and a 2x2 pixel
shuffle that turns each tile's 32x32 patches into 256 tokens.

The model only sees a flat batch of tiles; an image is a run of placeholders in the prompt
(``<img>`` + 256 per tile + ``</img>``), so images are found from the runs. What vtc reads
per tower patch ([CLS] attention, keys) is pushed through the model's own ``pixel_shuffle``,
then averaged over the four patches of each token.
"""

from __future__ import annotations

import torch

from vtc import ops
from vtc.plan import ModelInfo
from vtc.registry import register_adapter

from .adapter import Adapter
from .llava import feature_layer_index


@register_adapter
class InternVLAdapter(Adapter):
    """InternVL family: per image, tiles of ``image_seq_length`` tokens (thumbnail last)."""

    family = "internvl"
    class_names = ("InternVLForConditionalGeneration",)
    model_types = ("internvl",)
    # The processor's default upper bound on tiles per image, thumbnail excluded: the plan's
    # image is the largest one (13 tiles); smaller ones keep the same fractions.
    max_tiles = 12

    def vision_attention(self, layer: int):
        return self.base().vision_tower.encoder.layer[layer].attention

    def info(self) -> ModelInfo:
        cfg, vcfg = self.model.config, self.model.config.vision_config
        layer = cfg.vision_feature_layer
        if not isinstance(layer, int):
            layer = max(layer, key=lambda i: i % (vcfg.num_hidden_layers + 1))
        return ModelInfo(
            family=self.family,
            image_tokens=cfg.image_seq_length * (self.max_tiles + 1),
            vision_layers=vcfg.num_hidden_layers,
            vision_feature_layer=feature_layer_index(layer, vcfg.num_hidden_layers),
            has_cls=True,
            tiled=True,
            **self.text_sizes(),
        )

    def vision_hidden_size(self) -> int:
        return self.model.config.vision_config.hidden_size

    def patch_tokens(self, per_token: torch.Tensor, arguments: dict) -> list[torch.Tensor]:
        cfg = self.model.config
        tokens = self.without_cls(per_token, arguments)
        scalar = tokens.dim() == 2
        if scalar:
            tokens = tokens[..., None]
        tiles, patches, channels = tokens.shape
        side = int(patches**0.5)
        shuffled = self.base().pixel_shuffle(tokens.reshape(tiles, side, side, channels),
                                             scale_factor=cfg.downsample_ratio)
        # Each token concatenates the channels of its patches: average over those patches.
        per_token_out = shuffled.reshape(tiles, -1, shuffled.shape[-1] // channels, channels).mean(dim=2)
        return list(per_token_out[..., 0] if scalar else per_token_out)

    def pre_projector(self, out, arguments: dict):
        # The projector reads pixel-shuffled groups of four patches: no per-token tower features.
        return None

    def image_lengths(self, entries: list[torch.Tensor], image_mask: torch.Tensor) -> list[int]:
        # Entries are tiles; an image is a run of placeholders.
        return [rows.numel() for _, rows in ops.runs(image_mask)]

    def pooler_output(self, feats: list[torch.Tensor]):
        return torch.cat(feats)[None]
