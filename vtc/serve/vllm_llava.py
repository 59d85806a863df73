"""vLLM's LLaVA model with a vtc plan: fewer placeholders per image, as many features.

Imported by vLLM (through :func:`vtc.serve.register`) in the processes that build the model or
preprocess prompts; it imports vLLM, so nothing else in vtc imports it.

* :class:`VtcLlavaProcessingInfo` gives each image the plan's kept count of placeholders: vLLM
  sizes the prompt at preprocessing, before the model runs.
* :class:`VtcLlavaForConditionalGeneration` runs vLLM's own tower (asked for the [CLS] token
  too), reads the signals the plan's stages need from the attention inputs of the layers they
  name, and reduces each image with :func:`vtc.serve.core.reduce_image`.

With no method configured both behave exactly as vLLM's classes.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .config import served_plan


class _CLIPAttentionView:
    """The ``q_proj``/``k_proj`` view of vLLM's fused-QKV CLIP attention that
    :func:`vtc.ops.cls_attention` reads (single partition: the tower is not split across devices)."""

    def __init__(self, attn) -> None:
        self.attn = attn
        self.head_dim, self.scale = attn.head_dim, attn.scale
        self.num_heads = attn.num_heads

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        qkv, _ = self.attn.qkv_proj(x)
        return qkv.chunk(3, dim=-1)

    def q_proj(self, x: torch.Tensor) -> torch.Tensor:
        return self._qkv(x)[0]

    def k_proj(self, x: torch.Tensor) -> torch.Tensor:
        return self._qkv(x)[1]


class VtcLlavaProcessingInfo(LlavaProcessingInfo):
    """Placeholders per image: the count the configured plan keeps."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        sp = served_plan(self.get_hf_config())
        return n if sp is None else sp.count(n)


def _build_info(ctx) -> VtcLlavaProcessingInfo:
    return VtcLlavaProcessingInfo(ctx)


@MULTIMODAL_REGISTRY.register_processor(
    _build_llava_or_pixtral_hf_processor, info=_build_info, dummy_inputs=LlavaDummyInputsBuilder
)
class VtcLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's ``LlavaForConditionalGeneration`` whose image embeddings are reduced by a vtc plan."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtc_plan = served_plan(self.config)
        if self.vtc_plan is not None and self.config.vision_config.model_type == "pixtral":
            raise ValueError("vtc serves LLaVA checkpoints with a CLIP/SigLIP tower, not Pixtral")

    def _process_image_input(self, image_input):
        sp = self.vtc_plan
        if sp is None or not sp.stages or image_input["type"] != "pixel_values":
            return super()._process_image_input(image_input)
        return tuple(self._reduced_embeddings(sp, image_input["pixel_values"]))

    def _reduced_embeddings(self, sp, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Each image's projected features, reduced by the plan ``sp``."""
        from .core import reduce_image, tower_signals

        tower = self.vision_tower
        if sp.grid is not None:
            return self._downsampled_embeddings(sp, pixel_values)
        layers = tower.vision_model.encoder.layers
        captured: dict[int, tuple[_CLIPAttentionView, torch.Tensor]] = {}
        handles = []
        for i in sp.tower_layers:
            attn = layers[i].self_attn
            view = _CLIPAttentionView(attn)

            def hook(module, args, kwargs, i=i, view=view):
                captured[i] = (view, kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

            handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            full = tower(pixel_values, feature_select_strategy="full")  # [B, 1 + P, C], [CLS] first
        finally:
            for h in handles:
                h.remove()
        feats = self.multi_modal_projector(full[:, 1:])  # the "default" strategy (serve_plan checks it)
        signals = tower_signals(sp, captured, full, self.config.vision_config.num_attention_heads)
        out = []
        for b in range(feats.shape[0]):
            reduced, _ = reduce_image(sp, feats[b], {name: v[b] for name, v in signals.items()},
                                      project=self.multi_modal_projector)
            out.append(reduced)
        return out

    def _downsampled_embeddings(self, sp, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """``downsample``: the images resized to the plan's patch grid, encoded by vLLM's tower with its
        position embeddings interpolated (vLLM's CLIP embeddings take the trained size only, so their
        forward is swapped for :func:`vtc.serve.core.interpolated_embeddings` during this call)."""
        from .core import downsampled_pixels, interpolated_embeddings

        embeddings = self.vision_tower.vision_model.embeddings
        pixels = downsampled_pixels(sp, pixel_values, embeddings.patch_size)
        embeddings.forward = lambda x: interpolated_embeddings(embeddings, x)
        try:
            full = self.vision_tower(pixels, feature_select_strategy="full")  # [B, 1 + rows * cols, C]
        finally:
            del embeddings.forward  # back to the class's forward
        return list(self.multi_modal_projector(full[:, 1:]))
