"""Downsample against a reference of VTC-Bench's rule: the image resized (PIL bicubic, as
Chenfei-Liao/VTC-Bench ``qwen2_vl.py`` L255-259 resizes it before the processor) and encoded by the
*unpatched* model; what the LLM receives must be those features. LLaVA-1.5 (tiny, 336px, 576 tokens)
encodes the resized image with interpolated position embeddings; Qwen2.5-VL's reference cuts the
resized image into patches as the Hugging Face processor does (``Qwen2VLImageProcessor._preprocess``:
reshape to ``(t, tp, C, h/m, m, p, w/m, m, p)``, transpose ``(0, 3, 6, 4, 7, 2, 1, 5, 8)``).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

import vtc
from vtc import ops
from vtc.testing import qwen_inputs, tiny_inputs, tiny_llava, tiny_model

from .reference import llm_input as shared_llm_input

torch.set_num_threads(1)


@functools.cache
def _llava(attn: str):
    return tiny_llava(image_size=336, vision_layers=3, layers=2, attn=attn)


def pil_resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[C, H, W]`` float channels resized one by one with PIL's bicubic filter (VTC-Bench's)."""
    return torch.stack([torch.from_numpy(np.array(Image.fromarray(c.numpy(), mode="F").resize(
        (width, height), Image.BICUBIC))) for c in image.float()])


llm_input = functools.partial(shared_llm_input, method="downsample")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_downsample_llava_encodes_the_resized_image(attn):
    model = _llava(attn)
    inputs = tiny_inputs(model, batch=2, seed=3)
    ids = inputs["input_ids"]
    for budget, (rows, cols) in {64: (8, 8), 128: (11, 11), 192: (13, 14)}.items():
        embeds, kept = llm_input(model, inputs, budget=budget)
        with torch.no_grad():
            small = torch.stack([pil_resize(im, rows * 14, cols * 14) for im in inputs["pixel_values"]])
            hidden = model.model.vision_tower(small, output_hidden_states=True, interpolate_pos_encoding=True)
            ref = model.model.multi_modal_projector(hidden.hidden_states[model.config.vision_feature_layer][:, 1:])
        assert ref.shape[1] == rows * cols
        assert embeds.shape[1] == ids.shape[1] - 576 + rows * cols
        for b in range(2):
            start = int((ids[b] == model.config.image_token_id).nonzero()[0])
            torch.testing.assert_close(embeds[b, start:start + rows * cols], ref[b], atol=2e-4, rtol=1e-3)
            # Each token stands at the original token in the middle of the area it covers.
            # A grid of the original tokens: its rows and columns each in one original row and column.
            grid = kept[b].view(rows, cols)
            assert bool(((grid // 24).diff(dim=0) > 0).all()) and bool(((grid % 24).diff(dim=1) > 0).all())
            assert bool(((grid // 24) == (grid // 24)[:, :1]).all()) and bool(((grid % 24) == (grid % 24)[:1]).all())


def patchify(image: torch.Tensor, tp: int, m: int, p: int) -> torch.Tensor:
    """One image ``[C, H, W]`` as Qwen2VLImageProcessor cuts it (the frame repeated to ``tp``)."""
    c, h, w = image.shape
    x = image[None].repeat(tp, 1, 1, 1).reshape(1, tp, c, h // p // m, m, p, w // p // m, m, p)
    return x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape((h // p) * (w // p), c * tp * p * p)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_downsample_qwen_encodes_the_resized_image(attn, family):
    model = tiny_model(family, attn=attn, text_model="qwen2")
    vcfg = model.config.vision_config
    tp, m, p = vcfg.temporal_patch_size, vcfg.spatial_merge_size, vcfg.patch_size
    inputs = qwen_inputs(model, images=[[(8, 12)]], seed=4)
    image = torch.randn(3, 8 * p, 12 * p, generator=torch.Generator().manual_seed(1))
    inputs["pixel_values"] = patchify(image, tp, m, p)
    start = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    for budget, (rows, cols) in {0.5: (3, 4), 0.25: (2, 3), 1 / 6: (2, 2)}.items():
        embeds, kept = llm_input(model, inputs, budget=budget)
        small = patchify(pil_resize(image, rows * m * p, cols * m * p), tp, m, p)
        with torch.no_grad():
            ref = model.model.get_image_features(small, torch.tensor([[1, rows * m, cols * m]])).pooler_output[0]
        assert embeds.shape[1] == inputs["input_ids"].shape[1] - 24 + rows * cols
        torch.testing.assert_close(embeds[0, start:start + rows * cols], ref, atol=2e-4, rtol=1e-3)
        assert kept[0].numel() == rows * cols


def test_downsampled_grid_and_refusals():
    assert [ops.downsampled_grid(24, 24, k) for k in (64, 128, 192)] == [(8, 8), (11, 11), (13, 14)]
    assert [ops.downsampled_grid(12, 12, k) for k in (48, 32, 16)] == [(6, 8), (5, 6), (4, 4)]
    assert ops.downsampled_grid(4, 6, 6) == (2, 3) and ops.downsampled_grid(4, 6, 12) == (3, 4)
    with pytest.raises(ValueError):
        ops.downsampled_grid(4, 4, 17)
    for family in ("llava_next", "internvl"):
        with pytest.raises(vtc.MethodNotApplicableError, match="fixed-size tiles"):
            vtc.plan(tiny_model(family), "downsample", budget=0.25)
    plan = vtc.plan(_llava("sdpa"), "downsample")
    assert plan.stages[0].keep == 64 and plan.stages[0].positions == "compact"
