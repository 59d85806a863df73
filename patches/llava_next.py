"""Adapter for LLaVA-NeXT (``LlavaNextForConditionalGeneration``): a base image and a grid of
high-resolution tiles per image, packed by the model into one run of placeholders.

The model packs each image as the base image's tokens, then the tile grid row by row with
the padding removed and an ``image_newline`` token ending each row. Everything vtc reads
per tower token ([CLS] attention, keys, token layout) is pushed through the model's own
``pack_image_features`` so it lines up with the packed features exactly. Newline tokens are
protected: kept at every stage, counted in the budget.
"""

from __future__ import annotations

import torch

from vtc.plan import ModelInfo
from vtc.registry import register_adapter

from .adapter import Adapter
from .llava import LlavaAdapter


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT (LLaVA-1.6) family: per image, a base image plus anyres tiles."""

    family = "llava_next"
    class_names = ("LlavaNextForConditionalGeneration",)
    model_types = ("llava_next",)
    has_layout = True
    forward_params = (*LlavaAdapter.forward_params, "image_sizes")

    def _grid(self) -> int:
        vcfg = self.model.config.vision_config
        return vcfg.image_size // vcfg.patch_size

    def info(self) -> ModelInfo:
        base = super().info()
        g, size = self._grid(), self.model.config.vision_config.image_size
        # The plan's image is the largest one the model takes: an image exactly the size of its
        # largest pinpoint (no padding to remove). Other images keep the same fractions.
        largest = max(g * g + (h // size) * g * (w // size) * g + (h // size) * g
                      for h, w in self.model.config.image_grid_pinpoints)
        return ModelInfo(**{**base.__dict__, "family": self.family, "image_tokens": largest, "tiled": True,
                                         "tile_regions": True})

    def _tiles(self, image_sizes) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        return [image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                for size in image_sizes]

    def _pack(self, per_tile: torch.Tensor, arguments: dict, fill: float = 0.0) -> list[torch.Tensor]:
        """``per_tile`` ``[tiles of all images, patches, C]`` -> packed ``[n_i, C]`` per image, row
        ends filled with ``fill``."""
        sizes = arguments["image_sizes"]
        parts = list(per_tile.split(self._tiles(sizes)))
        newline = per_tile.new_full((per_tile.shape[-1],), fill)
        packed, _ = self.base().pack_image_features(parts, sizes, self.feature_strategy(arguments),
                                                    image_newline=newline)
        return packed

    def _resizable(self) -> bool:
        return False  # tiles of the tower's fixed size, chosen by the processor (image_grid_pinpoints)

    def downsample(self, arguments: dict, keep_for):
        return Adapter.downsample(self, arguments, keep_for)

    def patch_tokens(self, per_token: torch.Tensor, arguments: dict) -> list[torch.Tensor]:
        tokens = self.without_cls(per_token, arguments)
        if tokens.dim() == 2:  # a score per token
            return [p[:, 0] for p in self._pack(tokens[..., None], arguments)]
        return self._pack(tokens, arguments)

    def layout(self, arguments: dict) -> list[dict[str, torch.Tensor]]:
        """Per image: ``protected`` (row ends), ``tile`` (0 the base image, 1.. the tiles in row-major
        order, -1 a row end), ``region`` (for a base token, the tile whose part of the image
        it shows; for a tile token its own tile) and ``band`` (as ``region``, but a base token's
        tile as HiRED's official code assigns it: the flat base grid reshaped to
        ``(rows, cols, -1)``, i.e. consecutive horizontal bands taken as the tiles in order)."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        cfg = self.model.config
        size, g = cfg.vision_config.image_size, self._grid()
        sizes = arguments["image_sizes"]
        tiles = self._tiles(sizes)
        device = arguments["pixel_values"].device
        # Each tower token's (tile, patch) as a number, pushed through the model's packing.
        index = torch.arange(sum(tiles) * g * g, device=device, dtype=torch.float64).view(-1, g * g, 1)
        starts = torch.tensor([0, *tiles[:-1]], device=device).cumsum(0)
        out = []
        for packed, start, hw, count in zip(self._pack(index, arguments, fill=-1.0), starts, sizes, tiles):
            flat = packed[:, 0]
            newline = flat < 0
            tile = torch.where(newline, -1, (flat // (g * g)).long() - start)
            rows, cols = get_anyres_image_grid_shape(hw, cfg.image_grid_pinpoints, size) if count > 1 else (1, 1)
            region = tile.clone()
            base = tile == 0
            patch = (flat % (g * g)).long()
            region[base] = self._base_regions(hw, rows, cols, size, g, device)[patch[base]]
            band = tile.clone()
            band[base] = 1 + patch[base] * (rows * cols) // (g * g)
            out.append({"protected": newline, "tile": tile, "region": region, "band": band})
        return out

    @staticmethod
    def _base_regions(hw, rows: int, cols: int, size: int, g: int, device) -> torch.Tensor:
        """For each patch of the base image (the whole image resized to one tile), the tile that
        shows its centre: tiles cover the image resized to fit the grid's canvas, centred."""
        h, w = (float(x) for x in hw)
        scale = min(rows * size / h, cols * size / w)
        top, left = (rows * size - h * scale) / 2, (cols * size - w * scale) / 2
        centre = (torch.arange(g, device=device, dtype=torch.float64) + 0.5) / g
        r = ((top + centre * h * scale) // size).long().clamp(0, rows - 1)
        c = ((left + centre * w * scale) // size).long().clamp(0, cols - 1)
        return (1 + r[:, None] * cols + c[None, :]).flatten()
