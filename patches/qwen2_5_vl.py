"""Adapter for Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): a ViT without a [CLS] token
(``model.model.visual``), window attention over 2x2 groups of patches, a patch merger that turns
each 2x2 group into one LLM token, images of any size (``image_grid_thw``), and 3-D M-RoPE
positions (temporal, height, width) computed from the whole original prompt.

* **Images.** ``get_image_features`` returns one entry per image (``h * w / 4`` tokens, raster
  order of the merged grid); the prompt holds one run of ``image_token_id`` per image.
* **Positions.** Survivors keep their original 3-D positions (the family's default, ``keep``): the
  base forward's ``position_ids`` are computed before the reduction with the model's own
  ``compute_3d_position_ids`` (which also caches ``rope_deltas`` as the model does) and gathered
  with the rows. ``generate`` numbers decode steps from the original prompt (``text position +
  rope_deltas``), so they stay right; a decode step given no ``position_ids`` (a hand-written loop)
  is numbered here from the original prompt (cache length + the dropped rows + ``rope_deltas``),
  where the model would count the shorter cache. ``compact`` (vision stages only) re-indexes each
  image's survivors as a smaller grid (:meth:`Qwen2_5_VLAdapter.compact_positions`); compact layer
  stages are refused (:meth:`check_plan`).
* **Tower signals.** A per-patch quantity read in the tower (a vision layer's keys, for ``merge``)
  is in window order, four patches per LLM token: it is averaged over each token's four patches
  and put back in raster order with the tower's own window index (``get_vision_window_index``),
  as the tower itself does with its merger's output.
* **No [CLS] token.** ``visionzip`` ranks dominant patches by the attention each receives, averaged
  over heads and over the queries of its image, at the tower's last full-attention block
  (:meth:`Qwen2_5_VLAdapter.received_attention`), mapped like the keys above.
* **Video** (``pixel_values_videos``, ``video_grid_thw``) is reduced like an image: each video is one
  entry of ``t/2 * h * w / 4`` tokens (its temporal groups in order) whose frames are reduced *jointly*
  (one top-k or merge over all of the video's tokens, not per frame), with the budget per video: the
  plan's fraction of its tokens (:meth:`~vtc.plan.Plan.keeps_for`), so equivalent tokens per frame-set.
  In-LLM stages rank video rows with image rows. Survivors keep their 3-D (t, h, w) positions;
  ``compact`` positions are refused for a prompt with video. Tower signals (``merge``'s keys,
  ``visionzip``'s received attention, per frame at a full-attention block) are read from
  ``get_video_features`` as from ``get_image_features``.
"""

from __future__ import annotations

import inspect
import sys

import torch

from vtc import ops
from vtc.errors import MethodNotApplicableError, UnsupportedConfigurationError
from vtc.plan import ModelInfo, Plan
from vtc.registry import register_adapter

from .adapter import Adapter


@register_adapter
class Qwen2_5_VLAdapter(Adapter):
    """Qwen2.5-VL family: images of any size, 3-D M-RoPE positions kept by default."""

    family = "qwen2_5_vl"
    class_names = ("Qwen2_5_VLForConditionalGeneration",)
    model_types = ("qwen2_5_vl",)
    forward_params = (*Adapter.forward_params, "image_grid_thw", "mm_token_type_ids")
    # Rows of the prompt that stay with their tokens when rows are gathered.
    row_inputs = ("mm_token_type_ids",)
    # Survivors keep their original 3-D positions unless a method is given ``positions`` explicitly.
    default_positions = "keep"
    # Each entry's tokens are a grid per temporal group (:meth:`layout`), which ``pool`` pools.
    has_layout = True
    # Images come in any size: plans are compiled for a reference image of 1,024 tokens (896x896
    # pixels, 32x32 merged patches); an image of n tokens keeps the same fraction (Plan.keeps_for).
    reference_tokens = 1024

    def vision_attention(self, layer: int):
        return self.base().visual.blocks[layer].attn

    def info(self) -> ModelInfo:
        depth = self.model.config.vision_config.depth
        return ModelInfo(
            family=self.family,
            image_tokens=self.reference_tokens,
            vision_layers=depth,
            vision_feature_layer=depth - 1,
            has_cls=False,
            tiled=True,  # images of different sizes, not one square grid
            resizable=True,
            grids=True,  # but one grid per image (per temporal group of a video): see layout()
            video=True,
            received_layer=self.received_layer(),
            **self.text_sizes(),
        )

    def received_layer(self) -> int | None:
        """The vision block whose received attention ranks patches: the last full-attention block (every
        patch attends to its whole image there)."""
        depth = self.model.config.vision_config.depth
        return max((i for i in self.model.config.vision_config.fullatt_block_indexes if i < depth), default=None)

    def vision_hidden_size(self) -> int:
        return self.model.config.vision_config.hidden_size

    def check_plan(self, plan: Plan) -> None:
        compact = [s.where for s in plan.stages if s.positions == "compact" and s.layer is not None]
        if compact:
            raise UnsupportedConfigurationError(
                f"positions='compact' at layer stages ({', '.join(compact)}) is not supported on {self.family}: "
                f"survivors of an in-LLM stage keep their 3-D M-RoPE positions; pass positions='keep' (the default "
                f"for this family; a vision stage may compact)"
            )
        compute = getattr(self.base(), "compute_3d_position_ids", None)
        params = inspect.signature(compute).parameters if compute is not None else {}
        missing = [p for p in ("input_ids", "image_grid_thw", "attention_mask", "cache", "mm_token_type_ids")
                   if p not in params]
        if missing:
            raise UnsupportedConfigurationError(
                f"{type(self.base()).__name__}.compute_3d_position_ids is missing or no longer takes {missing}: "
                f"this transformers version changed how Qwen2.5-VL computes positions; install a supported "
                f"version (vtc.MIN_TRANSFORMERS)"
            )

    def encode_images(self, arguments: dict):
        return self.base().get_image_features(arguments["pixel_values"], arguments["image_grid_thw"],
                                              **{**arguments.get("kwargs", {}), "return_dict": True})

    @property
    def video_token_id(self) -> int:
        return self.model.config.video_token_id

    def encode_videos(self, arguments: dict):
        return self.base().get_video_features(arguments["pixel_values_videos"], arguments.get("video_grid_thw"),
                                              return_dict=True)

    def received_attention(self, module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Per tower patch (window order), the attention it receives in ``module``, averaged over heads and
        over the queries of its attention span (``cu_seqlens``: its image at a full-attention block), from
        the module's own ``qkv``, vision RoPE and scaling; queries in blocks to bound memory."""
        # The tower's own vision RoPE, from the module that defines its attention (Qwen2.5-VL, Qwen3-VL).
        apply_rotary_pos_emb_vision = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision
        n = hidden.shape[0]
        q, k, _ = module.qkv(hidden).reshape(n, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = kwargs["position_embeddings"]
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        bounds = kwargs["cu_seqlens"].tolist()
        out = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        for start, end in zip(bounds[:-1], bounds[1:]):
            qs, ks = q[start:end].transpose(0, 1).float(), k[start:end].transpose(0, 1).float()  # [H, m, d]
            # Query blocks of at most 2**24 probabilities (64 MB in float32) whatever the image's size.
            block = max(1, 2**24 // (module.num_heads * (end - start)))
            for s in range(0, end - start, block):
                probs = torch.softmax(qs[:, s: s + block] @ ks.transpose(1, 2) * module.scaling, dim=-1)
                out[start:end] += probs.sum(dim=(0, 1))
            out[start:end] /= module.num_heads * (end - start)
        return out

    def vision_keys(self, module, hidden: torch.Tensor) -> torch.Tensor:
        # One fused projection: [q | k | v].
        return module.qkv(hidden).unflatten(-1, (3, -1))[..., 1, :]

    def patch_tokens(self, per_token: torch.Tensor, arguments: dict) -> list[torch.Tensor]:
        from transformers.vision_utils import get_vision_window_index

        grid = arguments["image_grid_thw"] if "image_grid_thw" in arguments else arguments["video_grid_thw"]
        visual = self.base().visual
        window_index, _ = get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                                  window_size=visual.window_size, patch_size=visual.patch_size)
        unit = visual.spatial_merge_unit
        scalar = per_token.dim() == 1
        x = per_token[:, None] if scalar else per_token
        # Four consecutive patches (window order) make one token; undo the window order as the tower does.
        x = x.reshape(-1, unit, x.shape[-1]).mean(dim=1)[torch.argsort(window_index.to(x.device))]
        entries = x.split((grid.prod(-1) // unit).tolist())
        return [e[:, 0] if scalar else e for e in entries]

    def layout(self, arguments: dict) -> list[dict[str, torch.Tensor]]:
        """Per entry (image or video), each token's temporal group (``frame``), ``row`` and ``col`` in its merged
        grid (raster order per group), from ``image_grid_thw`` / ``video_grid_thw``: ``pool`` pools each group's
        grid."""
        grid = arguments["image_grid_thw"] if "image_grid_thw" in arguments else arguments["video_grid_thw"]
        merge = self.base().visual.spatial_merge_size
        out = []
        for t, h, w in grid.tolist():
            f, r, c = torch.meshgrid(torch.arange(t), torch.arange(h // merge), torch.arange(w // merge),
                                     indexing="ij")
            out.append({"frame": f.flatten().to(grid.device), "row": r.flatten().to(grid.device),
                        "col": c.flatten().to(grid.device)})
        return out

    def downsample(self, arguments: dict, keep_for) -> tuple[dict, list[torch.Tensor], list[int]]:
        """Each image rebuilt from its patches, resized (bicubic) to the merged-token grid
        :func:`vtc.ops.downsampled_grid` gives for its budget, and cut into patches again as the processor
        does (``image_grid_thw`` to match), as VTC-Bench resizes the image before the processor. Video refused."""
        if "image_grid_thw" not in arguments:
            raise MethodNotApplicableError("downsample resizes images only: pass video without it, or use another "
                                           "method for the video")
        visual = self.base().visual
        m, p = visual.spatial_merge_size, visual.patch_size
        tp = self.model.config.vision_config.temporal_patch_size
        pixels, grids, sources, counts, start = [], [], [], [], 0
        for t, h, w in arguments["image_grid_thw"].tolist():
            x = arguments["pixel_values"][start: start + t * h * w]
            start += t * h * w
            channels = x.shape[-1] // (tp * p * p)
            # The processor's patch order: (t, rows/m, cols/m, m, m) x (C, tp, p, p).
            image = x.reshape(t, h // m, w // m, m, m, channels, tp, p, p).permute(0, 6, 5, 1, 3, 7, 2, 4, 8)
            image = image.reshape(t * tp, channels, h * p, w * p)
            rows, cols = h // m, w // m
            new_rows, new_cols = ops.downsampled_grid(rows, cols, max(1, keep_for(t * rows * cols) // t))
            image = ops.resize_images(image, new_rows * m * p, new_cols * m * p)
            image = image.reshape(t, tp, channels, new_rows, m, p, new_cols, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
            pixels.append(image.reshape(t * new_rows * m * new_cols * m, -1))
            grids.append([t, new_rows * m, new_cols * m])
            centres = ops.grid_centres(rows, cols, new_rows, new_cols, device=x.device)
            sources.append(torch.cat([centres + f * rows * cols for f in range(t)]))
            counts.append(t * rows * cols)
        grid = torch.tensor(grids, dtype=arguments["image_grid_thw"].dtype, device=arguments["image_grid_thw"].device)
        return {**arguments, "pixel_values": torch.cat(pixels), "image_grid_thw": grid}, sources, counts

    def pre_projector(self, out, arguments: dict):
        # The merger reads 2x2 groups of patches: no per-token tower features.
        return None

    def prefill_positions(self, a: dict) -> None:
        """The 3-D positions the model would compute for the whole original prompt (before rows are
        dropped), with the model's own code; it caches ``rope_deltas`` as the model's forward does."""
        if a["position_ids"] is not None or a["input_ids"] is None:
            return
        a["position_ids"] = self.base().compute_3d_position_ids(
            input_ids=a["input_ids"], image_grid_thw=a.get("image_grid_thw"),
            video_grid_thw=a.get("video_grid_thw"), inputs_embeds=a["inputs_embeds"],
            attention_mask=a["attention_mask"], cache=a["cache"],
            second_per_grid_ts=a.get("second_per_grid_ts"), mm_token_type_ids=a.get("mm_token_type_ids"),
        )

    def reduce_positions(self, a, rows, pad, ragged, compact):
        pos = a["position_ids"]
        if pos is None or pos.dim() == 2:
            return super().reduce_positions(a, rows, pad, ragged, compact)
        # [3 or 4, B, T] (generate prepends the text positions): each row of positions gathered.
        pos = torch.stack([ops.gather_tokens(p, rows) for p in pos])
        if not compact:
            return pos, None
        if a.get("video_grid_thw") is not None and bool((a["input_ids"] == self.video_token_id).any()):
            raise UnsupportedConfigurationError(
                f"positions='compact' is not supported with video on {self.family}: a video's survivors keep their "
                f"3-D (t, h, w) positions; pass positions='keep' (the default for this family)")
        mask = a["attention_mask"]
        valid = ~pad if mask is None else ops.gather_tokens(mask, rows).bool() & ~pad
        image = ops.gather_tokens(a["input_ids"], rows) == self.image_token_id
        return self.compact_positions(pos, image, valid)

    @staticmethod
    def compact_positions(pos: torch.Tensor, image: torch.Tensor, valid: torch.Tensor):
        """3-D positions ``[..., 3, B, T]`` of the kept rows re-indexed as if each image were smaller: within
        an image (a run of ``image`` rows), each axis (t, h, w) of the survivors is replaced by its rank among
        the survivors' values on that axis, i.e. the grid rows and columns left with no survivor are removed
        (pooling a grid 2x2 gives exactly the smaller grid); the image then spans ``max(rows, cols)``
        positions, as the model's ``get_rope_index`` counts an image, and text rows follow contiguously.
        Returns the positions and, per sample ``[B, 1]``, how much earlier the next position now is.

        Example:
            >>> pos = torch.tensor([0, 1, 1, 1, 1, 3])[None, None].repeat(3, 1, 1)  # text, a 2x2 image, text
            >>> pos[1:, 0, 1:5] += torch.tensor([[0, 0, 1, 1], [0, 1, 0, 1]])  # its rows and columns
            >>> kept = torch.tensor([0, 2, 5])  # text, the image's token (0, 1), text
            >>> new, shift = Qwen2_5_VLAdapter.compact_positions(
            ...     pos[:, :, kept], torch.tensor([[False, True, False]]), torch.ones(1, 3, dtype=torch.bool))
            >>> new[:, 0].tolist(), shift.tolist()  # a 1x1 image now: the text after it moves back by one
            ([[0, 1, 2], [0, 1, 2], [0, 1, 2]], [[1]])
        """
        out = pos.clone()
        spatial = pos[-3:]
        shifts = []
        for b in range(pos.shape[1]):
            idx = valid[b].nonzero()[:, 0]
            flags, counts = torch.unique_consecutive(image[b, idx], return_counts=True)
            cur, start = 0, 0
            for flag, count in zip(flags.tolist(), counts.tolist()):
                seg = idx[start: start + count]
                start += count
                if not flag:
                    out[-3:, b, seg] = cur + torch.arange(count, device=pos.device)
                    cur += count
                    continue
                ranks = torch.stack([torch.unique(axis, return_inverse=True)[1] for axis in spatial[:, b, seg]])
                out[-3:, b, seg] = cur + ranks
                cur += int(ranks[1:].max()) + 1
            end = int(spatial[:, b, idx].max()) + 1 if idx.numel() else 0
            shifts.append(end - cur)
        return out, torch.tensor(shifts, device=pos.device)[:, None]

    def last_row(self, pos):
        if pos.dim() == 3 and pos.shape[0] == 4:  # generate's leading row: the text positions
            return int(pos[0, :, -1].max())
        # An M-RoPE row (the last token is text: every row equal) is the row index + rope_deltas.
        last = (pos[0] if pos.dim() == 3 else pos)[:, -1:]
        deltas = self.base().rope_deltas
        if deltas is not None:
            last = last - deltas.repeat_interleave(max(1, last.shape[0] // deltas.shape[0]), dim=0).to(last.device)
        return int(last.max())

    def shift_positions(self, pos, shift):
        if pos.dim() == 3:  # the M-RoPE rows; generate's leading text row stays as generate numbers it
            return torch.cat([pos[:-3], pos[-3:] - shift])
        return pos - shift

    def decode_positions(self, a: dict, past: int, offset: int) -> None:
        if a["position_ids"] is not None or not offset:
            return
        ids = a["input_ids"] if a["input_ids"] is not None else a["inputs_embeds"]
        bsz, n = ids.shape[:2]
        mask = a["attention_mask"]
        if mask is not None and mask.dim() == 2:
            text = (mask.long().cumsum(-1) - 1)[:, -n:]
        else:
            text = torch.arange(past + offset, past + offset + n, device=ids.device)[None].expand(bsz, -1)
        deltas = self.base().rope_deltas
        if deltas is not None:
            text = text + deltas.repeat_interleave(bsz // deltas.shape[0], dim=0).to(text.device)
        a["position_ids"] = text[None].expand(3, -1, -1)
