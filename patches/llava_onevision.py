"""Adapter for LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): a SigLIP tower (no [CLS]
token), LLaVA-NeXT-style anyres tiles capped by ``anyres_max``, and video frames pooled 2x2.

* **Images.** ``get_image_features`` packs each image as the base tile's tokens, then the tile grid
  row by row with the padding removed, bilinearly downscaled when it exceeds ``anyres_max_N`` tiles'
  worth of tokens (by more than 1.1x), an ``image_newline`` ending each row; an image of a multi-image
  sample (``batch_num_images`` > 1) is its base tile and one newline. Everything vtc reads per tower
  token (attention received, keys) is pushed through the model's own ``pack_image_features``, so it
  is unpadded and downscaled exactly as the features are; newlines are protected (kept at every stage,
  counted in the budget).
* **No [CLS] token.** ``vtc_cls`` and ``hired`` are refused. ``visionzip`` ranks dominant tokens by the
  attention each patch receives, averaged over heads and over the queries of its tile, at the feature
  layer (:meth:`LlavaOnevisionAdapter.received_attention`, from the SigLIP attention's own ``q_proj``,
  ``k_proj`` and scale), as VisionZip's and VisPruner's ports to towers without [CLS] score.
* **Video** (``pixel_values_videos``, ``[videos, frames, 3, S, S]``): ``get_video_features`` pools each
  frame's grid 2x2 (bilinear) and appends one newline per video. Each video is one entry of
  ``frames * pooled + 1`` tokens whose frames are reduced *jointly* (one top-k or merge over all of its
  tokens), with the budget per video: the plan's fraction of its tokens (:meth:`~vtc.plan.Plan.keeps_for`).
  Tower signals are mapped through the model's own ``apply_pooling``; the newline is protected.
  ``pool`` pools each grid on its own (a video's frames, a multi-image sample's single tiles; layout
  ``frame``, ``row``, ``col``) to an equal share of the entry's budget, and refuses an anyres image.
  Positions: the LM's RoPE is 1-D, so the methods' own policies (``compact`` included) apply.
"""

from __future__ import annotations

import math

import torch

from vtc.plan import ModelInfo
from vtc.registry import register_adapter

from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter

# Layout ``frame`` of a token: its frame (videos; 0 for a single-tile image), or one of these.
NEWLINE, NOT_A_GRID = -1, -2


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision family: anyres_max images, pooled video frames, a tower without [CLS].

    Example:
        >>> from vtc.testing import tiny_llava_onevision
        >>> info = LlavaOnevisionAdapter(tiny_llava_onevision(layers=1, vision_layers=1)).info()
        >>> info.image_tokens, info.has_cls, info.received_layer  # a 140x70 image: 25 + 10x5 + 10 newlines
        (85, False, 0)
    """

    family = "llava_onevision"
    class_names = ("LlavaOnevisionForConditionalGeneration",)
    model_types = ("llava_onevision",)
    forward_params = (*LlavaNextAdapter.forward_params, "pixel_values_videos", "batch_num_images")

    @property
    def video_token_id(self) -> int:
        return self.model.config.video_token_id

    def info(self) -> ModelInfo:
        base = LlavaAdapter.info(self)
        cfg = self.model.config
        # The plan's image is the largest one the model takes: an image exactly the size of a pinpoint.
        largest = max(self._count(tuple(p)) for p in cfg.image_grid_pinpoints)
        return ModelInfo(**{**base.__dict__, "family": self.family, "image_tokens": largest, "has_cls": False,
                            "tiled": True, "tile_regions": False,
                            # pool: a video's frames and a single-tile image are grids (see layout)
                            "grids": True,
                            "video": True,
                            # SigLIP has no [CLS]: the attention each patch receives at the feature layer.
                            "received_layer": base.vision_feature_layer,
                            # one patch per token (before the downscaling of large images), attending within its tile
                            "received_patches": 1, "received_span": self._grid() ** 2})

    def _count(self, size: tuple[int, int]) -> int:
        """Tokens of an anyres image of original ``size`` (h, w), by the model's own packing."""
        g = self._grid()
        tiles = self._tiles([size], None)
        return self._pack(torch.zeros(tiles[0], g * g, 1), {"image_sizes": [size]})[0].shape[0]

    def _tiles(self, image_sizes, batch_num_images=None) -> list[int]:
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        cfg = self.model.config
        # As get_image_features: an image of a multi-image sample is its base tile only.
        single = ([False] * len(image_sizes) if batch_num_images is None
                  else [int(n) != 1 for n in batch_num_images for _ in range(int(n))])
        return [1 if one else image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                for size, one in zip(image_sizes, single)]

    def _aspect(self, arguments: dict) -> str:
        return arguments.get("vision_aspect_ratio") or self.model.config.vision_aspect_ratio

    def _pack(self, per_tile: torch.Tensor, arguments: dict, fill: float = 0.0) -> list[torch.Tensor]:
        """``per_tile`` ``[tiles of all images, patches, C]`` -> packed ``[n_i, C]`` per image (unpadded,
        downscaled as the features are), row ends filled with ``fill``."""
        sizes = arguments["image_sizes"]
        parts = list(per_tile.split(self._tiles(sizes, arguments.get("batch_num_images"))))
        newline = per_tile.new_full((per_tile.shape[-1],), fill)
        packed, _ = self.base().pack_image_features(parts, sizes, image_newline=newline,
                                                    vision_aspect_ratio=self._aspect(arguments))
        return packed

    def encode_images(self, arguments: dict):
        # As the model's forward calls it (it passes no vision_aspect_ratio: the config's applies).
        encode = self.base().get_image_features
        names = ("pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy",
                 "batch_num_images")
        return encode(**{k: arguments[k] for k in names if arguments.get(k) is not None},
                      **{**arguments.get("kwargs", {}), "return_dict": True})

    def encode_videos(self, arguments: dict):
        names = ("vision_feature_layer", "vision_feature_select_strategy")
        return self.base().get_video_features(arguments["pixel_values_videos"],
                                              **{k: arguments[k] for k in names if arguments.get(k) is not None},
                                              return_dict=True)

    def video_pooler_output(self, feats: list[torch.Tensor]) -> torch.Tensor:
        # The forward flattens a [videos, tokens, D] tensor; every video of a batch keeps as many tokens.
        return torch.stack(feats)

    def received_attention(self, module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Per tile (or frame) and tower patch ``[tiles, patches]``, the attention the patch receives in the
        SigLIP attention ``module``, averaged over heads and over the tile's queries, from the module's own
        ``q_proj``, ``k_proj`` and ``scale`` (SigLIP's tower attends within each tile, unmasked); one tile
        at a time to bound memory."""
        tiles, n, _ = hidden.shape
        heads = module.num_heads
        out = torch.empty(tiles, n, dtype=torch.float32, device=hidden.device)
        for t in range(tiles):
            q = module.q_proj(hidden[t]).view(n, heads, -1).transpose(0, 1).float()
            k = module.k_proj(hidden[t]).view(n, heads, -1).transpose(0, 1).float()
            out[t] = torch.softmax(q @ k.transpose(1, 2) * module.scale, dim=-1).mean(dim=(0, 1))
        return out

    def patch_tokens(self, per_token: torch.Tensor, arguments: dict) -> list[torch.Tensor]:
        if "pixel_values_videos" not in arguments:
            return super().patch_tokens(per_token, arguments)
        tokens = self.without_cls(per_token, arguments)
        scalar = tokens.dim() == 2
        x = tokens[..., None] if scalar else tokens
        videos, frames = arguments["pixel_values_videos"].shape[:2]
        # The model's own 2x2 pooling of each frame's grid, then its frames in order and a newline per video.
        pooled = self.base().apply_pooling(x.contiguous()).reshape(videos, -1, x.shape[-1])
        out = torch.cat([pooled, pooled.new_zeros(videos, 1, x.shape[-1])], dim=1)
        return [e[:, 0] if scalar else e for e in out]

    def _pooled_per_frame(self) -> int:
        g = self._grid()
        return self.base().apply_pooling(torch.zeros(1, g * g, 1)).shape[1]

    def layout(self, arguments: dict) -> list[dict[str, torch.Tensor]]:
        """Per entry: ``protected`` (row ends; a video's newline) and each token's place in the grids ``pool``
        averages: ``frame`` (a video token's frame; 0 for a single-tile image's tokens, one square grid;
        ``NOT_A_GRID`` for an anyres image's; ``NEWLINE`` for a row end), ``row`` and ``col`` in its grid."""
        if "pixel_values_videos" in arguments:
            videos, frames = arguments["pixel_values_videos"].shape[:2]
            side = math.isqrt(self._pooled_per_frame())  # the model pools each frame to a square grid
            return [_grids(frames, side, arguments["pixel_values_videos"].device) for _ in range(videos)]
        sizes = arguments["image_sizes"]
        tiles = self._tiles(sizes, arguments.get("batch_num_images"))
        g = self._grid()
        device = arguments["pixel_values"].device
        ones = torch.ones(sum(tiles), g * g, 1, device=device)
        out = []
        for packed, count in zip(self._pack(ones, arguments, fill=-1.0), tiles):
            if count == 1:  # the base tile's grid and one newline
                out.append(_grids(1, g, device))
                continue
            newline = packed[:, 0] < 0
            place = torch.full_like(newline, NOT_A_GRID, dtype=torch.long).masked_fill(newline, NEWLINE)
            out.append({"protected": newline, "frame": place, "row": place, "col": place})
        return out


def _grids(frames: int, side: int, device) -> dict[str, torch.Tensor]:
    """The layout of ``frames`` square grids of ``side`` tokens in raster order, then one newline."""
    frame, row, col = (t.flatten() for t in torch.meshgrid(
        *(torch.arange(n, device=device) for n in (frames, side, side)), indexing="ij"))
    end = torch.tensor([NEWLINE], device=device)
    frame, row, col = (torch.cat([t, end]) for t in (frame, row, col))
    return {"protected": frame == NEWLINE, "frame": frame, "row": row, "col": col}
