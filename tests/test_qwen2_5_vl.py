"""Qwen2.5-VL specifics: 3-D positions kept through decoding, tower signals mapped through the
window order and the 2x2 merger, refusals (no [CLS] token, compact positions), video untouched.
The shared matrix (tests/test_equivalence.py) runs every applicable method on this family too."""

from __future__ import annotations

import pytest
import torch

import vtc
from vtc.errors import MethodNotApplicableError, UnsupportedConfigurationError
from vtc.registry import get_adapter
from vtc.testing import qwen_inputs, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2_5_vl", layers=4, vision_layers=2)


@pytest.mark.parametrize("case", [("random", {"budget": 0.5, "seed": 1}), ("merge", {"budget": 0.4}),
                                  ("fastv", {"budget": 0.6}), ("pdrop", {"budget": 0.5})])
def test_decode_steps_without_position_ids_follow_the_original_numbering(model, case):
    # A hand-written loop passes no position_ids: the model would number a decode step by the cache's
    # length plus rope_deltas, and a vision reduction left the cache shorter than the prompt.
    method, params = case
    inputs = qwen_inputs(model, images=[[(8, 12)]], seed=3)
    with vtc.compressed(model, method, **params), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
        first = model(**inputs, use_cache=True)
        cache, logits = first.cache, [first.logits[:, -1]]
        for t in range(2):
            step = model(input_ids=tokens[:, t: t + 1], cache=cache, use_cache=True)
            cache = step.cache
            logits.append(step.logits[:, -1])
    for t in range(3):
        torch.testing.assert_close(logits[t], out.logits[t], atol=1e-5, rtol=1e-5)


def test_survivors_keep_their_3d_positions_by_default(model):
    plan = vtc.plan(model, "random", budget=0.5)
    assert {s.positions for s in plan.stages} == {"keep"}
    assert vtc.plan(model, "pdrop", budget=0.5, positions="keep").stages[0].positions == "keep"
    # Positions gathered with the rows: each kept image row keeps its (t, h, w) position.
    inputs = qwen_inputs(model, images=[[(8, 8)]], seed=0)
    full, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                         image_grid_thw=inputs["image_grid_thw"])
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["position_ids"]), with_kwargs=True)
    try:
        with vtc.compressed(model, "random", budget=0.5, seed=2), torch.no_grad():
            model(**inputs)
            kept = vtc.stats(model).kept["vision"][0]
    finally:
        handle.remove()
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
    rows = torch.cat([(inputs["input_ids"][0] != model.config.image_token_id).nonzero()[:, 0], image[kept]])
    assert torch.equal(seen[0][:, 0], full[:, 0, rows.sort().values])


def test_compact_positions_are_refused(model):
    for method in ("random", "pdrop"):
        with pytest.raises(UnsupportedConfigurationError, match="compact.*positions='keep'"):
            vtc.apply(model, method, budget=0.5, positions="compact")
        assert not vtc.is_applied(model)


@pytest.mark.parametrize("method", ["vtc_cls", "visionzip", "hired", "pool", "tome"])
def test_methods_the_tower_cannot_serve_are_refused(model, method):
    with pytest.raises(MethodNotApplicableError, match="use "):
        vtc.plan(model, method, budget=0.5)


def test_tower_signals_follow_the_window_order_and_the_merger(model):
    # Each patch's (row, col), in the order the tower's blocks see patches (window order, four patches
    # of a merged token together), mapped to tokens: token (r, c) of the merged grid averages its four
    # patches, (2r + 0.5, 2c + 0.5), in raster order.
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    visual = model.model.visual
    grid = torch.tensor([[1, 8, 12], [1, 12, 8]])
    coords = get_vision_position_ids(grid, visual.spatial_merge_size).float()
    window_index, _ = get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                              window_size=visual.window_size, patch_size=visual.patch_size)
    assert not torch.equal(window_index, torch.arange(window_index.numel()))  # windows do reorder
    per_patch = visual.permute_input_for_window_attn(coords, window_index, seq_len=coords.shape[0])
    tokens = get_adapter(model).patch_tokens(per_patch, {"image_grid_thw": grid})
    for (_, h, w), got in zip(grid.tolist(), tokens):
        r, c = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
        expected = torch.stack([2 * r + 0.5, 2 * c + 0.5], dim=-1).reshape(-1, 2).float()
        torch.testing.assert_close(got, expected)


def test_adapter_chosen_by_class_and_model_type(tmp_path):
    tiny_model("qwen2_5_vl", layers=2, vision_layers=1).save_pretrained(tmp_path)
    loaded = vtc.from_pretrained(str(tmp_path), method="fastv", budget=0.75, layer=1)
    assert loaded.__dict__["_vtc"].adapter.family == "qwen2_5_vl"
    assert "Qwen2_5_VLForConditionalGeneration" in vtc.list_models()


def test_video_passes_through_unreduced(model):
    # An image and a video in one prompt: the image is reduced, the video's tokens all stay.
    cfg = model.config
    inputs = qwen_inputs(model, images=[[(8, 8)]], seed=5)
    video = torch.full((1, 2 * 8 * 8 // 4), cfg.video_token_id)
    ids = torch.cat([inputs["input_ids"][:, :4], video, inputs["input_ids"][:, 4:]], dim=1)
    types = torch.cat([inputs["mm_token_type_ids"][:, :4], torch.full_like(video, 2),
                       inputs["mm_token_type_ids"][:, 4:]], dim=1)
    dim = inputs["pixel_values"].shape[1]
    batch = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": types,
             "pixel_values_videos": torch.randn(2 * 8 * 8, dim, generator=torch.Generator().manual_seed(0)),
             "video_grid_thw": torch.tensor([[2, 8, 8]])}
    with vtc.compressed(model, "random", budget=0.5, seed=0), torch.no_grad():
        logits = model(**batch).logits
        out = model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert vtc.stats(model).images == 1
    assert logits.shape[1] == ids.shape[1] - 8  # 16 image tokens -> 8; the video's 32 all kept
    assert out.shape[1] == ids.shape[1] + 2


def test_cli_plans_on_the_qwen_shape(capsys):
    from vtc.cli import main

    assert main(["plan", "--model", "qwen2.5-vl-shape", "--method", "pdrop", "--budget", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "1024 visual tokens per image, 28 layers" in out and "keep" in out
    assert main(["plan", "--model", "qwen2.5-vl-shape", "--method", "vtc_cls"]) == 2
