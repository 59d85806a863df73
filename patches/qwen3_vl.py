"""Qwen3-VL (dense, and the MoE variant, whose model forward is the same path): a ViT of 16px patches with full
attention in every block, the 2x2 patch merger, 3-D (interleaved) M-RoPE positions, and **DeepStack**: the
features of a few vision blocks (``deepstack_visual_indexes``), each through its own merger, are added to the
LLM's hidden states at the visual rows after its first decoder layers (one layer per DeepStack feature).

It shares Qwen2.5-VL's adapter (:mod:`vtc.patches.qwen2_5_vl`: images of any size, 3-D positions kept by
default and ``compact`` for vision stages, decode steps numbered from the original prompt, video entries
reduced jointly with a budget per video). What differs:

* **Tower signals.** No window attention: the tower's patches come four per merged token, in the merged
  grid's raster order, so a per-patch quantity is averaged over each token's four patches
  (:meth:`Qwen3VLAdapter.patch_tokens`), as the merger groups them. ``visionzip``'s received attention is read
  at the last block (every block attends over the whole image).
* **DeepStack at vision stages.** Each entry's DeepStack features (one ``[tokens, D]`` per DeepStack layer)
  are the entry's *companions* (:meth:`~vtc.patches.adapter.Adapter.companions`): every vision stage reduces
  them with the same kept indices, or the same merge groups and weights
  (:func:`vtc.reduce.reduce_companions`), so each surviving row gets exactly the DeepStack features of what
  it stands for; the model then builds ``visual_pos_masks`` from the reduced prompt itself.
* **DeepStack at layer stages.** A layer stage before one of the DeepStack layers drops rows the model's
  ``visual_pos_masks`` and DeepStack embeddings still count: the language model's ``_deepstack_process`` is
  wrapped on the instance (restored by ``remove``) to gather both to the rows that survive
  (:meth:`Qwen3VLAdapter.llm_wrappers`).
* **Video.** The processor splits a video into one placeholder run per temporal group (with its timestamp
  text between runs); the video is still one entry, reduced jointly, its runs' surviving rows kept in place.
* Positions come from the model's own ``compute_3d_position_ids`` (no ``second_per_grid_ts`` here).
"""

from __future__ import annotations

import functools

import torch

from vtc import ops
from vtc.errors import UnsupportedConfigurationError
from vtc.plan import Plan
from vtc.registry import register_adapter

from .qwen2_5_vl import Qwen2_5_VLAdapter


@register_adapter
class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    """Qwen3-VL family (dense and MoE): Qwen2.5-VL's handling plus DeepStack."""

    family = "qwen3_vl"
    class_names = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    model_types = ("qwen3_vl", "qwen3_vl_moe")

    def received_layer(self) -> int:
        return self.model.config.vision_config.depth - 1  # every block attends over the whole image

    def check_plan(self, plan: Plan) -> None:
        super().check_plan(plan)
        lm = self.base().language_model
        if plan.layer_stages and not callable(getattr(lm, "_deepstack_process", None)):
            raise UnsupportedConfigurationError(
                f"{type(lm).__name__} has no _deepstack_process: this transformers version changed how Qwen3-VL "
                f"adds DeepStack features, which layer stages must follow; install a supported version "
                f"(vtc.MIN_TRANSFORMERS)"
            )

    def deepstack_layers(self) -> int:
        """How many of the LLM's first layers receive DeepStack features."""
        return len(self.model.config.vision_config.deepstack_visual_indexes)

    def patch_tokens(self, per_token: torch.Tensor, arguments: dict) -> list[torch.Tensor]:
        grid = arguments["image_grid_thw"] if "image_grid_thw" in arguments else arguments["video_grid_thw"]
        unit = self.base().visual.spatial_merge_unit
        scalar = per_token.dim() == 1
        x = per_token[:, None] if scalar else per_token
        # Four consecutive patches make one merged token (the merger reads them as one row).
        x = x.reshape(-1, unit, x.shape[-1]).mean(dim=1)
        entries = x.split((grid.prod(-1) // unit).tolist())
        return [e[:, 0] if scalar else e for e in entries]

    def prefill_positions(self, a: dict) -> None:
        if a["position_ids"] is not None or a["input_ids"] is None:
            return
        a["position_ids"] = self.base().compute_3d_position_ids(
            input_ids=a["input_ids"], image_grid_thw=a.get("image_grid_thw"),
            video_grid_thw=a.get("video_grid_thw"), inputs_embeds=a["inputs_embeds"],
            attention_mask=a["attention_mask"], cache=a["cache"], mm_token_type_ids=a.get("mm_token_type_ids"),
        )

    # -- DeepStack -----------------------------------------------------------------------
    def companions(self, out) -> list[torch.Tensor] | None:
        """Per entry, its DeepStack features side by side ``[tokens, layers * D]``."""
        layers = getattr(out, "deepstack_features", None)
        if not layers:
            return None
        return [torch.cat(per_entry, dim=-1) for per_entry in zip(*layers, strict=True)]

    def set_companions(self, out, companions) -> None:
        if not getattr(out, "deepstack_features", None) or not companions or companions[0] is None:
            return
        count = len(out.deepstack_features)
        out.deepstack_features = [[c.unflatten(-1, (count, -1))[:, i] for c in companions] for i in range(count)]

    def llm_wrappers(self, state):
        lm = self.base().language_model

        def make(original):
            @functools.wraps(original)
            def _deepstack_process(hidden_states, visual_pos_masks, visual_embeds):
                seq = state()
                if seq is not None and visual_pos_masks is not None and seq.overrides:
                    # A layer stage ran: the hidden states hold only the rows it kept.
                    visual_pos_masks, visual_embeds = self.surviving_deepstack(seq, visual_pos_masks, visual_embeds)
                return original(hidden_states, visual_pos_masks, visual_embeds)

            return _deepstack_process

        return [(lm, "_deepstack_process", make)]

    @staticmethod
    def surviving_deepstack(seq, mask: torch.Tensor, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The visual-row mask ``[B, T]`` and DeepStack embeddings ``[visual rows, D]`` of the LLM's prefill input
        gathered to the rows a layer stage kept (``seq.rows``; padding slots are no visual row).

        Example:
            >>> from types import SimpleNamespace
            >>> seq = SimpleNamespace(rows=torch.tensor([[0, 2, 3]]), image_of=torch.tensor([[-1, 0, -1]]))
            >>> mask = torch.tensor([[False, True, True, False]])
            >>> m, e = Qwen3VLAdapter.surviving_deepstack(seq, mask, torch.tensor([[1.], [2.]]))
            >>> m.tolist(), e.tolist()
            ([[False, True, False]], [[2.0]])
        """
        rows = seq.rows.to(mask.device)
        full = embeds.new_zeros(*mask.shape, embeds.shape[-1])
        full[mask] = embeds
        kept = ops.gather_tokens(mask, rows) & (seq.image_of.to(mask.device) != -2)
        return kept, ops.gather_tokens(full, rows)[kept]
