"""Qwen3-VL specifics: DeepStack features reduced with the tokens at vision stages (the same kept rows, the same
merge groups and weights, the same pooling) and gathered to the survivors of layer stages before a DeepStack
layer; the tower's patches mapped through the 2x2 merger without windows; the MoE variant; the plan on the 8B's
shape. Qwen2.5-VL's family tests (3-D positions, compact positions, decoding, chat, beams, the video suite,
received attention) run here again on Qwen3-VL, under sdpa and eager; the shared matrix
(tests/test_equivalence.py) runs every applicable method on it too."""

from __future__ import annotations

import pytest
import torch

import vtc
from vtc.errors import MethodNotApplicableError
from vtc.reduce import reduce_vision, resized
from vtc.registry import get_adapter
from vtc.testing import qwen_inputs, tiny_model

from .reference import reference_logits
from .test_equivalence import assert_rows_match, prefill_logits, traced
from .test_qwen2_5_vl import (  # noqa: F401  (collected here, on this module's model)
    pool_check,
    test_beam_search_and_several_returns,
    test_chat_over_pruned_cache_equals_fresh_run,
    test_compact_batch_of_different_images_equals_single_samples,
    test_compact_decoding_continues_after_the_compacted_prompt,
    test_compact_positions_at_layer_stages_are_refused,
    test_compact_positions_remove_the_grid_rows_and_columns_left_empty,
    test_decode_steps_without_position_ids_follow_the_original_numbering,
    test_image_and_video_batch_equals_single_samples,
    test_pool_averages_each_grid_to_its_share,
    test_received_attention_equals_the_towers_eager_attention,
    test_survivors_keep_their_3d_positions_by_default,
    test_video_alone_is_reduced_and_compact_refused,
    test_video_cached_generation_equals_recomputation,
    test_video_drop_equals_mask,
    test_video_full_budget_is_identity,
    test_video_remove_restores_exactly,
)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    # DeepStack from vision blocks 0, 1, 2 into LLM layers 0, 1, 2 of 4.
    return tiny_model("qwen3_vl", layers=4, vision_layers=3, attn=request.param)


def _batch(model, seed=5):
    """Two padded samples: an image, then a 4-frame video (2 temporal groups, one run each); a smaller image."""
    return qwen_inputs(model, images=[[(8, 8)], [(4, 8)]], videos=[[(4, 8, 8)], []], seed=seed)


def _llm_call(model, inputs, method, **params):
    """What the language model receives at prefill under ``method`` (its keyword arguments), and the stats."""
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k) if not seen else None, with_kwargs=True)
    try:
        with vtc.compressed(model, method, **params), torch.no_grad():
            model(**inputs)
            stats = vtc.stats(model)
    finally:
        handle.remove()
    return seen[0], stats


def _entries(model, inputs):
    """The full model's features and DeepStack features (per layer), per entry: the images, then the videos."""
    with torch.no_grad():
        image = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        video = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    feats = list(image.pooler_output) + list(video.pooler_output)
    deep = [list(i) + list(v) for i, v in zip(image.deepstack_features, video.deepstack_features, strict=True)]
    return feats, deep


# The LLM's visual rows of _batch: sample 0's image and video, then sample 1's image.
ROW_ORDER = [0, 2, 1]


@pytest.mark.parametrize("case", [("random", {"budget": 0.5, "seed": 1}), ("divprune", {"budget": 0.3}),
                                  ("visionzip", {"budget": 0.5})], ids=["random", "divprune", "visionzip"])
def test_deepstack_of_kept_tokens_is_the_full_models(model, case):
    # Selection (and VisionZip's dominant tokens): each surviving visual row gets the DeepStack features the
    # unpatched model computes for the token it keeps; the model adds them at the reduced prompt's visual rows.
    method, params = case
    inputs = _batch(model)
    llm, stats = _llm_call(model, inputs, method, **params)
    kept = stats.kept["vision"]
    _, deep = _entries(model, inputs)
    assert len(llm["deepstack_visual_embeds"]) == 3
    for layer, got in zip(deep, llm["deepstack_visual_embeds"], strict=True):
        if method == "visionzip":  # each entry's dominant tokens come first; its contextual ones are merged
            stage, start = vtc.plan(model, method, **params).stages[0], 0
            for g in ROW_ORDER:
                n = kept[g].numel()
                dominant = dict(resized(stage, n).options)["dominant"]
                torch.testing.assert_close(got[start: start + dominant], layer[g][kept[g][:dominant]])
                start += n
            continue
        want = torch.cat([layer[g][kept[g]] for g in ROW_ORDER])
        torch.testing.assert_close(got, want)
    assert int(llm["visual_pos_masks"].sum()) == sum(k.numel() for k in kept)


def test_deepstack_is_merged_with_the_features_groups_and_weights(model):
    # merge: the DeepStack features of each merged token are merged exactly as its features are, i.e. the merge
    # applied to features and DeepStack features side by side, with the tower's keys as the metric.
    inputs = qwen_inputs(model, images=[[(8, 8), (8, 12)]], seed=3)
    llm, stats = _llm_call(model, inputs, "merge", budget=0.4)
    stage = vtc.plan(model, "merge", budget=0.4).stages[0]
    with vtc.compressed(model, "merge", budget=0.4), torch.no_grad():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        signals = [sig for _, sig in out.vtc_signals["entries"]]
    got_feats = llm["inputs_embeds"][0][llm["visual_pos_masks"][0]]
    start = 0
    for g, entry in enumerate(out.pooler_output):
        deep = [layer[g] for layer in out.deepstack_features]
        both = torch.cat([entry, *deep], dim=-1)[None]
        metric = signals[g][f"keys{stage.metric.layers[0]}"][None] if stage.metric else entry[None]
        k = vtc.plan(model, "merge", budget=0.4).keeps_for(entry.shape[0])[0]
        want, local = reduce_vision(resized(stage, k), both, None, metric)
        assert torch.equal(local[0].sort().values, stats.kept["vision"][g].sort().values)
        n = local.shape[1]
        d = entry.shape[-1]
        torch.testing.assert_close(got_feats[start: start + n], want[0, :, :d])
        for i, got in enumerate(llm["deepstack_visual_embeds"]):
            torch.testing.assert_close(got[start: start + n], want[0, :, d * (i + 1): d * (i + 2)])
        start += n


def test_pooled_deepstack_averages_each_block(model):
    # pool: the DeepStack features are pooled over the same 2x2 blocks as the features (pool_check checks those).
    import torch.nn.functional as F

    llm, inputs, rows = pool_check(model, "keep")
    _, deep = _entries(model, inputs)
    grids = torch.cat([inputs["image_grid_thw"], inputs["video_grid_thw"]]).tolist()
    for layer, got in zip(deep, llm["deepstack_visual_embeds"], strict=True):
        pooled = []
        for entry, (t, h, w) in zip(layer, grids):
            grid = entry.view(t, h // 2, w // 2, -1).permute(0, 3, 1, 2)
            pooled.append(F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2).reshape(-1, entry.shape[-1]))
        torch.testing.assert_close(got, torch.cat([pooled[g] for g in ROW_ORDER]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", [("fastv", {"budget": 0.6, "layer": 1}),
                                  ("pdrop", {"layers": (1, 2), "ratio": 0.5}),
                                  ("fastv", {"keep": 0.5, "layer": 3})], ids=["fastv@1", "pdrop@1,2", "fastv@3"])
def test_layer_stage_before_a_deepstack_layer_gathers_it(model, case):
    # Rows dropped before layers 1 and 2, which still receive DeepStack features: the model adds them at the
    # surviving visual rows only; the reference adds the full model's features to every row and masks the
    # dropped ones. After the DeepStack layers (fastv@3) nothing needs gathering.
    method, params = case
    inputs = _batch(model, seed=6)
    calls = []
    process = model.model.language_model._deepstack_process

    def spy(hidden, mask, embeds):
        calls.append((hidden.shape[1], mask.shape[1], embeds.shape[0], int(mask.sum())))
        return process(hidden, mask, embeds)

    model.model.language_model._deepstack_process = spy
    try:
        logits, stages, embeds, _ = traced(model, inputs, lambda: prefill_logits(model, inputs), method, **params)
    finally:
        del model.model.language_model._deepstack_process
    ref, rows = reference_logits(model, **inputs, stages=stages, vision_embeds=embeds)
    assert_rows_match(logits, ref, rows, inputs["attention_mask"])
    assert len(calls) == 3 and all(h == m and e == s for h, m, e, s in calls)
    first = stages[0][0]
    assert calls[0][0] == inputs["input_ids"].shape[1]  # layer 0 runs on the whole prompt
    assert (calls[1][0] < calls[0][0]) == (first <= 1)


def test_tower_signals_follow_the_merger(model):
    # Each patch's (row, col), in the order the tower sees patches (four per merged token), mapped to tokens:
    # token (r, c) of the merged grid averages its four patches, (2r + 0.5, 2c + 0.5), in raster order.
    from transformers.vision_utils import get_vision_position_ids

    grid = torch.tensor([[1, 8, 12], [2, 12, 8]])
    coords = get_vision_position_ids(grid, model.model.visual.spatial_merge_size).float()
    tokens = get_adapter(model).patch_tokens(coords, {"video_grid_thw": grid})
    for (t, h, w), got in zip(grid.tolist(), tokens):
        r, c = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
        expected = torch.stack([2 * r + 0.5, 2 * c + 0.5], dim=-1).reshape(-1, 2).float().repeat(t, 1)
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("method", ["vtc_cls", "hired", "tome"])
def test_methods_the_tower_cannot_serve_are_refused(model, method):
    with pytest.raises(MethodNotApplicableError, match="use "):
        vtc.plan(model, method, budget=0.5)


def test_moe_variant_is_served_alike():
    # Qwen3-VL-MoE's model forward is the dense one's: the same adapter, the same DeepStack handling.
    moe = tiny_model("qwen3_vl", layers=3, vision_layers=3, moe=True)
    assert get_adapter(moe).family == "qwen3_vl"
    inputs = _batch(moe, seed=7)
    for method, params in [(["random", "fastv"], {"budget": 0.5, "fastv.layer": 1, "seed": 1}),
                           ("merge", {"budget": 0.4})]:
        logits, stages, embeds, _ = traced(moe, inputs, lambda: prefill_logits(moe, inputs), method, **params)
        ref, rows = reference_logits(moe, **inputs, stages=stages, vision_embeds=embeds)
        assert_rows_match(logits, ref, rows, inputs["attention_mask"])


def test_adapter_chosen_by_class_and_model_type(tmp_path):
    tiny_model("qwen3_vl", layers=2, vision_layers=1, deepstack=(0,)).save_pretrained(tmp_path)
    loaded = vtc.from_pretrained(str(tmp_path), method="fastv", budget=0.75, layer=1)
    assert loaded.__dict__["_vtc"].adapter.family == "qwen3_vl"
    assert {"Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration"} <= set(vtc.list_models())


def test_cli_plans_on_the_qwen3_shape(capsys):
    from vtc.cli import main

    assert main(["plan", "--model", "qwen3-vl-shape", "--method", "pdrop", "--budget", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "1024 visual tokens per image, 36 layers" in out and "keep" in out
    assert main(["plan", "--model", "qwen3-vl-shape", "--method", "pool", "--budget", "0.25"]) == 0
    assert "pool(own_count=1)" in capsys.readouterr().out
    assert main(["plan", "--model", "qwen3-vl-shape", "--method", "vtc_cls"]) == 2
