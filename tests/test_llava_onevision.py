"""LLaVA-OneVision specifics: tower signals mapped through the model's packing (unpadding, anyres_max
downscaling, row ends) and its video pooling, received attention without [CLS], refusals, and video reduced
like images (one entry per video, frames jointly). The shared matrix (tests/test_equivalence.py) runs every
applicable method on this family's images, under sdpa and eager."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vtc
from vtc.errors import MethodNotApplicableError
from vtc.registry import get_adapter
from vtc.testing import image_token_count, onevision_inputs, onevision_video_tokens, split_inputs, tiny_model

from .test_equivalence import assert_rows_match, batch_equals_single_samples, greedy, prefill_logits, traced


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return tiny_model("llava_onevision", layers=4, vision_layers=2, attn=request.param)


def _reference_pack(model, per_tile: torch.Tensor, size: tuple[int, int], single: bool) -> torch.Tensor:
    """modeling_llava_onevision.py pack_image_features (L245-314) written out for a per-patch score ``[tiles, g*g]``:
    the base tile, then the tile grid unpadded, bilinearly downscaled beyond anyres_max_N tiles' worth, a row end
    (here -1) after each row; a multi-image sample's image is its base tile and one row end."""
    cfg = model.config
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    base = per_tile[0]
    if single:
        return torch.cat([base, base.new_full((1,), -1.0)])
    from transformers.image_processing_utils import select_best_resolution

    h, w = size
    best_h, best_w = select_best_resolution([h, w], cfg.image_grid_pinpoints)
    rows, cols = best_h // cfg.vision_config.image_size, best_w // cfg.vision_config.image_size
    grid = per_tile[1:1 + rows * cols].view(rows, cols, g, g).permute(0, 2, 1, 3).reshape(rows * g, cols * g)
    if w / h > grid.shape[1] / grid.shape[0]:
        pad = (grid.shape[0] - int(round(h * grid.shape[1] / w, 7))) // 2
        grid = grid[pad: grid.shape[0] - pad]
    else:
        pad = (grid.shape[1] - int(round(w * grid.shape[0] / h, 7))) // 2
        grid = grid[:, pad: grid.shape[1] - pad]
    ratio = math.sqrt(grid.numel() / (int(cfg.vision_aspect_ratio.removeprefix("anyres_max_")) * g * g))
    if ratio > 1.1:
        grid = F.interpolate(grid[None, None], [int(grid.shape[0] // ratio), int(grid.shape[1] // ratio)],
                             mode="bilinear")[0, 0]
    grid = torch.cat([grid, grid.new_full((grid.shape[0], 1), -1.0)], dim=1)
    return torch.cat([base, grid.flatten()])


def _received(module, hidden: torch.Tensor) -> torch.Tensor:
    """The attention each patch receives, from transformers' eager attention on the module's own projections."""
    from transformers.models.siglip.modeling_siglip import eager_attention_forward

    shape = (*hidden.shape[:-1], module.num_heads, -1)
    q, k, v = (p(hidden).view(shape).transpose(1, 2) for p in (module.q_proj, module.k_proj, module.v_proj))
    _, probs = eager_attention_forward(module, q, k, v, None, scaling=module.scale)
    return probs.mean(dim=(1, 2))  # over heads and queries: [tiles, patches]


def test_received_attention_follows_the_models_packing_and_pooling(model):
    # visionzip's signal without [CLS]: per patch, the attention it receives at the feature layer, averaged over
    # heads and the queries of its tile; pushed through the packing (an anyres image alone, downscaled; two
    # single-tile images) and through a video's 2x2 pooling, checked against the cited lines written out.
    adapter = get_adapter(model)
    layer = adapter.info().received_layer
    assert layer == model.config.vision_config.num_hidden_layers - 1  # the feature layer (-1): the last
    module = adapter.vision_attention(layer)
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("hidden_states", a[0] if a else None)),
                                              with_kwargs=True)
    one = onevision_inputs(model, images=[[(140, 140)]], videos=[[3]], seed=1)
    two = onevision_inputs(model, images=[[(140, 70), (70, 140)]], seed=2)
    try:
        with vtc.compressed(model, "visionzip", budget=0.5), torch.no_grad():
            outs = [model.model.get_image_features(**{k: i[k] for k in ("pixel_values", "image_sizes",
                                                                          "batch_num_images")})
                    for i in (one, two)]
            video = model.model.get_video_features(one["pixel_values_videos"])
    finally:
        handle.remove()
    key = f"recv{(layer,)}"
    g = model.config.vision_config.image_size // model.config.vision_config.patch_size
    with torch.no_grad():
        received = [_received(module, h) for h in seen]
    got = [sig[key] for out in outs for _, sig in out.vtc_signals["entries"]]
    expected = [_reference_pack(model, received[0], (140, 140), single=False)]
    expected += [_reference_pack(model, received[1][i: i + 1], None, single=True) for i in range(2)]
    assert got[0].numel() == image_token_count(model, (140, 140)) == g * g + 7 * 7 + 7  # 10x10 downscaled to 7x7
    for g_, e in zip(got, expected, strict=True):
        row_end = e < 0
        torch.testing.assert_close(g_[~row_end], e[~row_end], atol=1e-6, rtol=1e-5)
    pooled = F.interpolate(received[2].view(3, 1, g, g), size=[-(-g // 2)] * 2, mode="bilinear").flatten()
    (_, sig), = video.vtc_signals["entries"]
    assert sig[key].numel() == onevision_video_tokens(model, 3)
    torch.testing.assert_close(sig[key][:-1], pooled, atol=1e-6, rtol=1e-5)
    assert bool(sig["layout.protected"][-1]) and int(sig["layout.protected"].sum()) == 1  # the video's newline


def test_row_ends_are_protected(model):
    inputs = onevision_inputs(model, images=[[(140, 140)], [(70, 70), (140, 70)]], seed=3)
    layouts = get_adapter(model).layout(inputs)
    with vtc.compressed(model, "random", budget=0.15, seed=0), torch.no_grad():
        model(**inputs)
        kept = vtc.stats(model).kept["vision"]
    for layout, k in zip(layouts, kept, strict=True):
        ends = layout["protected"].nonzero()[:, 0]
        assert ends.numel() and bool(torch.isin(ends, k).all()) and k.numel() < layout["protected"].numel()


@pytest.mark.parametrize("method", ["vtc_cls", "hired"])
def test_cls_methods_are_refused_naming_the_alternatives(model, method):
    with pytest.raises(MethodNotApplicableError, match="no \\[CLS\\] token; use visionzip.*fastv"):
        vtc.plan(model, method, budget=0.5)


def test_tome_is_refused_and_pool_refuses_anyres_images(model):
    with pytest.raises(MethodNotApplicableError, match="use merge"):
        vtc.plan(model, "tome", budget=0.5)
    # pool averages grids: a video's frames and a multi-image sample's single tiles, not an anyres image.
    inputs = onevision_inputs(model, images=[[(70, 140)]], seed=4)
    with (vtc.compressed(model, "pool", budget=0.4), torch.no_grad(),
          pytest.raises(MethodNotApplicableError, match="pool averages token grids.*use random or merge")):
        model(**inputs)


def test_pool_averages_each_frame_and_single_tile_on_its_own(model):
    # Two single-tile images (5x5 grids) and a 3-frame video (3x3 pooled grids): each grid is pooled to its
    # share of the entry's budget, row ends and the video's newline kept.
    inputs = onevision_inputs(model, images=[[(70, 140), (140, 70)]], videos=[[3]], seed=6)
    with vtc.compressed(model, "pool", budget=0.4), torch.no_grad():
        model(**inputs)
        kept = vtc.stats(model).kept["vision"]
    plan = vtc.plan(model, "pool", budget=0.4)
    g = model.config.vision_config.image_size // model.config.vision_config.patch_size
    for k, n, grids in zip(kept, [g * g + 1, g * g + 1, onevision_video_tokens(model, 3)], [1, 1, 3], strict=True):
        budget = plan.keeps_for(n)[0] - 1  # the newline kept
        side = math.isqrt((n - 1) // grids)
        cells = (k[:-1].numel()) // grids
        assert k[-1] == n - 1 and k[:-1].numel() == grids * cells and 1 <= cells <= budget // grids
        # Each grid keeps as many tokens, all in that grid.
        assert torch.equal(torch.bincount(k[:-1] // (side * side), minlength=grids), torch.full((grids,), cells))


def test_plan_image_is_the_largest_the_model_takes(model):
    # The processor's count (vtc.testing.image_token_count) of an image the size of each pinpoint.
    largest = max(image_token_count(model, tuple(p)) for p in model.config.image_grid_pinpoints)
    assert get_adapter(model).info().image_tokens == largest


def test_cli_plans_on_the_onevision_shape(capsys):
    from vtc.cli import main

    assert main(["plan", "--model", "llava-onevision-shape", "--method", "visionzip", "--budget", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "8154 visual tokens per image, 28 layers" in out and "received_attention@vision[25]" in out
    assert main(["plan", "--model", "llava-onevision-shape", "--method", "vtc_cls"]) == 2


# -- video ---------------------------------------------------------------------------------------------------
VIDEO_CASES = [("random", {"budget": 0.5, "seed": 1}), ("merge", {"budget": 0.4}), ("fastv", {"budget": 0.6}),
               ("pdrop", {"budget": 0.5}), ("visionzip", {"budget": 0.5}), ("divprune", {"budget": 0.3}),
               ("random+fastv", {"budget": 0.6, "seed": 2, "fastv.layer": 1}), ("pool", {"budget": 0.4}),
               ("vispruner", {"budget": 0.4}), ("cdpruner", {"budget": 0.4}), ("aim", {"budget": 0.4}),
               ("dart", {"budget": 0.6, "pivot_image": 2, "pivot_text": 2}),
               ("sparsevlm", {"budget": 0.5, "recycle": False})]
VIDEO_IDS = [c[0] for c in VIDEO_CASES]


def _video_batch(model, case, seed=5):
    """Two padded samples: an anyres image then a 3-frame video (28 tokens); a taller image alone. For ``pool``,
    which averages grids only, two single-tile images (a multi-image sample) in each sample instead."""
    images = [[(70, 140)], [(140, 70)]] if case[0] != "pool" else [[(70, 140), (140, 70)], [(140, 140), (70, 70)]]
    return onevision_inputs(model, images=images, videos=[[3], []], pad=[0, 4], seed=seed)


def _args(case):
    method, params = case
    return (method.split("+") if "+" in method else method), params


@pytest.mark.parametrize("case", VIDEO_CASES, ids=VIDEO_IDS)
def test_video_full_budget_is_identity(model, case):
    inputs = _video_batch(model, case, seed=3)
    with torch.no_grad():
        ref = model(**inputs).logits
    ref_out = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    method, params = _args(case)
    with vtc.compressed(model, method, **{**params, "budget": 1.0}):
        with torch.no_grad():
            logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(logits, ref) and torch.equal(out, ref_out)


@pytest.mark.parametrize("case", VIDEO_CASES, ids=VIDEO_IDS)
def test_video_drop_equals_mask(model, case):
    # The video is one entry of 3 frames x 9 pooled tokens + its newline, its frames reduced jointly.
    from .reference import reference_logits

    inputs = _video_batch(model, case)
    method, params = _args(case)
    logits, stages, embeds, stats = traced(model, inputs, lambda: prefill_logits(model, inputs), method, **params)
    ref, rows = reference_logits(model, **inputs, stages=stages, vision_embeds=embeds)
    assert_rows_match(logits, ref, rows, inputs["attention_mask"])
    video = onevision_video_tokens(model, 3)
    assert stats.images == (3 if case[0] == "pool" else 2)  # the first sample's images and video
    last = list(stats.kept.values())[-1]
    assert last[-1].numel() < video  # the video: the last entry, after every image
    if "vision" in stats.kept:  # a pre-LLM stage keeps the video's newline
        assert video - 1 in stats.kept["vision"][-1].tolist()


@pytest.mark.parametrize("case", VIDEO_CASES[:4], ids=VIDEO_IDS[:4])
def test_video_cached_generation_equals_recomputation(model, case):
    from .reference import reference_logits

    inputs = _video_batch(model, case, seed=8)
    method, params = _args(case)
    (tokens, step_logits), stages, embeds, _ = traced(
        model, inputs, lambda: greedy(model, inputs, steps=3), method, **params)
    extra = {k: inputs[k] for k in ("image_sizes", "batch_num_images", "pixel_values_videos")}
    for t in range(tokens.shape[1]):
        ids = torch.cat([inputs["input_ids"], tokens[:, :t]], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(tokens[:, :t])], dim=1)
        pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 0)
        ref, _ = reference_logits(model, ids, mask, inputs["pixel_values"], stages, position_ids=pos,
                                  vision_embeds=embeds, prompt=inputs["input_ids"].shape[1], **extra)
        torch.testing.assert_close(step_logits[:, t], ref[:, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", VIDEO_CASES, ids=VIDEO_IDS)
def test_image_and_video_batch_equals_single_samples(model, case):
    batch = _video_batch(model, case, seed=9)
    singles = split_inputs(model, batch)
    assert "pixel_values_videos" in singles[0] and "pixel_values_videos" not in singles[1]
    method, params = _args(case)
    batch_equals_single_samples(model, batch, singles, method, steps=3, **params)


@pytest.mark.parametrize("case", VIDEO_CASES, ids=VIDEO_IDS)
def test_video_remove_restores_exactly(model, case):
    inputs = _video_batch(model, case, seed=10)
    attrs = {id(m): set(m.__dict__) for m in model.modules()}
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    with torch.no_grad():
        before = model(**inputs).logits
    method, params = _args(case)
    vtc.apply(model, method, **params)
    with torch.no_grad():
        reduced = model(**inputs).logits
    vtc.remove(model)
    with torch.no_grad():
        after = model(**inputs).logits
    assert reduced.shape != before.shape or not torch.equal(reduced, before)
    assert torch.equal(after, before)
    assert {id(m): set(m.__dict__) for m in model.modules()} == attrs
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks


@pytest.mark.parametrize("positions", ["compact", "keep"])
def test_video_alone_is_reduced_per_video(model, positions):
    # Two videos of 4 frames (37 tokens each): each keeps its share of the budget, its newline included.
    inputs = onevision_inputs(model, images=[[], []], videos=[[4], [4]], seed=11)
    for name in ("pixel_values", "image_sizes", "batch_num_images"):
        del inputs[name]
    n = onevision_video_tokens(model, 4)
    keep = vtc.plan(model, "random", budget=0.5).keeps_for(n)[0]
    with vtc.compressed(model, "random", budget=0.5, seed=0, positions=positions), torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
        stats = vtc.stats(model)
    kept = stats.kept["vision"]
    assert len(kept) == 2 and all(k.numel() == keep for k in kept) and keep < n  # a video per sample
    assert all(n - 1 in k.tolist() for k in kept)  # each video's newline
    assert logits.shape[1] == inputs["input_ids"].shape[1] - (n - keep)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
