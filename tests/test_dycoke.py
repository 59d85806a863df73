"""DyCoke's token temporal merging (``dycoke``): the operator against a transcription of the official code, and
the method on the families that take video (LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL): what enters the LLM equals
the official rule applied to the unpatched model's video features; full budget, cached decoding, batches,
``remove``; images unchanged; refusals. The shared matrix (tests/test_equivalence.py) runs on images only, which
dycoke leaves unchanged, so it has no cases there."""

from __future__ import annotations

import functools

import pytest
import torch

import vtc
from vtc.errors import BudgetError, MethodNotApplicableError
from vtc.ops import temporal_prune, temporal_prune_counts
from vtc.testing import onevision_inputs, qwen_inputs, split_inputs, tiny_model

from .test_equivalence import assert_rows_match, batch_equals_single_samples, greedy, prefill_logits, traced


# -- the official rule, written out -------------------------------------------------------------------------------
def official_ttm(image_feature, num_tokens_per_frame=196, merging_ratio=0.7):
    """KD-TAO/DyCoke @dd74634, ``llava/model/llava_arch.py`` L35-93 (``dycole_ttm``), line for line. Only change:
    the two ``torch.stack`` of the similarity lists skip an empty list (the official code raises there for fewer
    than 5 frames), and ``torch.tensor(similarity)`` is a ``clone`` (the same copy, without the warning)."""
    num_frames = image_feature.shape[0] // num_tokens_per_frame
    merging_ratio = 1 - merging_ratio
    similarities = []
    for i in range(0, num_frames - 1, 2):
        frame1_tokens = image_feature[i * num_tokens_per_frame: (i + 1) * num_tokens_per_frame]
        frame2_tokens = image_feature[(i + 1) * num_tokens_per_frame: (i + 2) * num_tokens_per_frame]
        frame1_norm = torch.nn.functional.normalize(frame1_tokens, p=2, dim=1)
        frame2_norm = torch.nn.functional.normalize(frame2_tokens, p=2, dim=1)
        similarity = torch.nn.functional.cosine_similarity(frame1_norm, frame2_norm, dim=1)
        similarities.append(similarity)
    if similarities:
        similarities = torch.stack([similarity.clone() for similarity in similarities])
    modified_image_feature = []
    for i in range(0, num_frames - 1, 2):
        frame1_tokens = image_feature[i * num_tokens_per_frame: (i + 1) * num_tokens_per_frame]
        frame2_tokens = image_feature[(i + 1) * num_tokens_per_frame: (i + 2) * num_tokens_per_frame]
        avg_similarity = similarities[i // 2]
        num_tokens_to_keep = int(merging_ratio * num_tokens_per_frame)
        tokens_to_keep = avg_similarity.topk(num_tokens_to_keep, largest=False).indices
        modified_image_feature.append(frame1_tokens)
        modified_image_feature.append(frame2_tokens[tokens_to_keep])
    odd_similarities = []
    for i in range(0, num_frames - 4, 4):
        frame1_tokens = image_feature[i * num_tokens_per_frame: (i + 1) * num_tokens_per_frame]
        frame2_tokens = image_feature[(i + 2) * num_tokens_per_frame: (i + 3) * num_tokens_per_frame]
        similarity = torch.nn.functional.cosine_similarity(frame1_tokens, frame2_tokens, dim=1)
        odd_similarities.append(similarity)
    if odd_similarities:
        odd_similarities = torch.stack([similarity.clone() for similarity in odd_similarities])
    for i in range(0, num_frames - 4, 4):
        frame1_tokens = image_feature[i * num_tokens_per_frame: (i + 1) * num_tokens_per_frame]
        frame2_tokens = image_feature[(i + 2) * num_tokens_per_frame: (i + 3) * num_tokens_per_frame]
        avg_similarity = odd_similarities[i // 4]
        num_tokens_to_keep = int(merging_ratio * num_tokens_per_frame)
        tokens_to_keep = avg_similarity.topk(num_tokens_to_keep, largest=False).indices
        modified_image_feature[i] = frame1_tokens
        modified_image_feature[i + 2] = frame2_tokens[tokens_to_keep]
    combined_tokens = torch.cat(modified_image_feature, dim=0)
    return combined_tokens


def official_for_count(tokens, per_frame, count):
    """``official_ttm`` keeping ``count`` tokens of each pruned frame (``dycoke_k`` chosen so that
    ``int((1 - k) * N) == count``)."""
    return official_ttm(tokens, per_frame, 1 - (count + 0.5) / per_frame)


def rows_of(out, feats):
    """The index in ``feats`` ``[n, D]`` of each row of ``out`` (features are distinct)."""
    match = (out[:, None, :] == feats[None]).all(-1)
    assert bool((match.sum(1) == 1).all()), "features are not distinct"
    return match.float().argmax(1)


@pytest.mark.parametrize("frames", [2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("per_frame", [1, 7, 196])
@pytest.mark.parametrize("k", [0.7, 0.5, 0.9, 0.0])
def test_temporal_prune_equals_the_official_ttm(frames, per_frame, k):
    feats = torch.randn(frames * per_frame, 16, generator=torch.Generator().manual_seed(frames * 1000 + per_frame))
    ref = official_ttm(feats, per_frame, k)
    index = temporal_prune(feats.view(frames, per_frame, 16), int((1 - k) * per_frame))
    assert torch.equal(feats[index], ref)  # the same tokens in the same order (ascending similarity)
    whole, pruned = temporal_prune_counts(frames)
    assert index.numel() == whole * per_frame + pruned * int((1 - k) * per_frame)


def test_temporal_prune_keeps_a_single_frame_and_refuses_bad_counts():
    feats = torch.randn(1, 5, 4)
    assert torch.equal(temporal_prune(feats, 2), torch.arange(5))
    with pytest.raises(ValueError, match="between 0 and 5"):
        temporal_prune(torch.randn(2, 5, 4), 6)


def test_default_is_the_official_evaluation_setting():
    # lmms-eval llava_onevision.py L89-92: dycoke_k=0.7, so int((1 - 0.7) * 196) tokens of a pruned frame.
    from vtc.methods.dycoke import DyCoke

    assert DyCoke.default_ratio == 0.3 and int(0.3 * 196) == int((1 - 0.7) * 196) == 58


# -- models ---------------------------------------------------------------------------------------------------------
@functools.cache
def _model(family: str, attn: str = "sdpa"):
    vision = {"qwen3_vl": 3}.get(family, 2)  # Qwen3-VL: DeepStack from vision blocks 0, 1, 2
    return tiny_model(family, layers=4, vision_layers=vision, attn=attn)


def _lm_call(model, inputs, method=None, **params):
    """The language model's keyword arguments at prefill (unpatched when ``method`` is None), and the logits."""
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k) if not seen else None, with_kwargs=True)
    try:
        if method is None:
            logits = prefill_logits(model, inputs)
        else:
            with vtc.compressed(model, method, **params):
                logits = prefill_logits(model, inputs)
    finally:
        handle.remove()
    return seen[0], logits


def _onevision(frames, seed=1, images=((70, 140),)):
    model = _model("llava_onevision")
    return model, onevision_inputs(model, images=[list(images)], videos=[[frames]], seed=seed)


def _qwen(family, groups, seed=1):
    model = _model(family)
    return model, qwen_inputs(model, images=[[(8, 8)]], videos=[[(2 * groups, 8, 8)]], seed=seed)


@pytest.mark.parametrize("frames", [5, 8])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_onevision_llm_input_is_the_official_ttm_of_the_video(frames, attn):
    # The official call (llava_arch.py L388-392): TTM on the frames' flattened pooled tokens, then the newline.
    model = _model("llava_onevision", attn)
    inputs = onevision_inputs(model, images=[[(70, 140)]], videos=[[frames]], seed=frames)
    with torch.no_grad():
        video = model.model.get_video_features(inputs["pixel_values_videos"], return_dict=True).pooler_output[0]
    per_frame = (video.shape[0] - 1) // frames
    full, _ = _lm_call(model, inputs)
    got, _ = _lm_call(model, inputs, "dycoke")
    rows = (inputs["input_ids"][0] == model.config.video_token_id).nonzero()[:, 0]
    start, end = int(rows[0]), int(rows[-1]) + 1
    reduced = torch.cat([official_ttm(video[:-1], per_frame, 0.7), video[-1:]])
    expected = torch.cat([full["inputs_embeds"][0, :start], reduced, full["inputs_embeds"][0, end:]])
    assert torch.equal(got["inputs_embeds"][0], expected)  # the image passes unchanged, the video as official
    pos = got["position_ids"]
    assert pos is None or torch.equal(pos.flatten(), torch.arange(expected.shape[0]))  # contiguous, as official


def test_onevision_budget_keeps_the_most_tokens_per_pruned_frame_within_it():
    model, inputs = _onevision(9, seed=3)
    with torch.no_grad():
        video = model.model.get_video_features(inputs["pixel_values_videos"], return_dict=True).pooler_output[0]
    per_frame, n = (video.shape[0] - 1) // 9, video.shape[0]
    allowed = vtc.plan(model, "dycoke", budget=0.5).keeps_for(n)[0]
    count = max(c for c in range(per_frame + 1) if official_for_count(video[:-1], per_frame, c).shape[0] + 1 <= allowed)
    got, _ = _lm_call(model, inputs, "dycoke", budget=0.5)
    rows = (inputs["input_ids"][0] == model.config.video_token_id).nonzero()[:, 0]
    reduced = torch.cat([official_for_count(video[:-1], per_frame, count), video[-1:]])
    assert 0 < count < per_frame
    assert torch.equal(got["inputs_embeds"][0, int(rows[0]): int(rows[0]) + reduced.shape[0]], reduced)
    assert got["inputs_embeds"].shape[1] == inputs["input_ids"].shape[1] - (n - reduced.shape[0])


def _qwen_expected(model, inputs, full, count_of=lambda per_frame: int(0.3 * per_frame)):
    """The unpatched LLM call's rows that the official TTM keeps of the video (in the original order: Qwen keeps
    positions), with the groups as frames."""
    with torch.no_grad():
        out = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"],
                                             return_dict=True)
    video = out.pooler_output[0]
    groups = int(inputs["video_grid_thw"][0, 0])
    per_frame = video.shape[0] // groups
    kept = rows_of(official_for_count(video, per_frame, count_of(per_frame)), video).sort().values
    ids = inputs["input_ids"][0]
    video_rows = (ids == model.config.video_token_id).nonzero()[:, 0]
    rows = torch.cat([(ids != model.config.video_token_id).nonzero()[:, 0], video_rows[kept]]).sort().values
    return rows


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("groups", [5, 8])
def test_qwen_llm_input_is_the_official_ttm_of_the_temporal_groups(family, groups):
    model, inputs = _qwen(family, groups, seed=groups)
    full, _ = _lm_call(model, inputs)
    got, _ = _lm_call(model, inputs, "dycoke")
    rows = _qwen_expected(model, inputs, full)
    assert torch.equal(got["inputs_embeds"][0], full["inputs_embeds"][0, rows])
    assert torch.equal(got["position_ids"], full["position_ids"][..., rows])  # each token at its own (t, h, w)
    if family == "qwen3_vl":  # DeepStack features gathered with the tokens
        visual = full["visual_pos_masks"][0].nonzero()[:, 0]
        keep = torch.isin(visual, rows)
        assert torch.equal(got["visual_pos_masks"][0], full["visual_pos_masks"][0, rows])
        for mine, theirs in zip(got["deepstack_visual_embeds"], full["deepstack_visual_embeds"], strict=True):
            assert torch.equal(mine, theirs[keep])


def test_qwen_budget_solves_the_count_per_pruned_frame():
    model, inputs = _qwen("qwen2_5_vl", 5, seed=2)
    n = int(inputs["video_grid_thw"][0].prod()) // 4
    allowed = vtc.plan(model, "dycoke", budget=0.6).keeps_for(n)[0]
    # 5 groups of 16: group 0 whole, 1 and 3 cut against their pair's first, 2 against 0, 4 dropped.
    tokens = torch.randn(n, 8)
    count = max(c for c in range(17) if official_for_count(tokens, 16, c).shape[0] <= allowed)
    full, _ = _lm_call(model, inputs)
    got, _ = _lm_call(model, inputs, "dycoke", budget=0.6)
    rows = _qwen_expected(model, inputs, full, count_of=lambda per_frame: count)
    assert 0 < count < 16 and torch.equal(got["inputs_embeds"][0], full["inputs_embeds"][0, rows])


# -- the model's guarantees with a video --------------------------------------------------------------------------
def _batch(family, seed):
    """Two padded samples: an image then a video (5 frames / temporal groups); another image alone."""
    model = _model(family)
    if family == "llava_onevision":
        return model, onevision_inputs(model, images=[[(70, 140)], [(140, 70)]], videos=[[5], []], pad=[0, 4],
                                       seed=seed)
    return model, qwen_inputs(model, images=[[(8, 8)], [(4, 8)]], videos=[[(10, 8, 8)], []], seed=seed)


FAMILIES = ["llava_onevision", "qwen2_5_vl", "qwen3_vl"]


@pytest.mark.parametrize("family", FAMILIES)
def test_full_budget_is_identity(family):
    model, inputs = _batch(family, seed=3)
    ref = prefill_logits(model, inputs)
    ref_out = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with vtc.compressed(model, "dycoke", budget=1.0):
        logits = prefill_logits(model, inputs)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(logits, ref) and torch.equal(out, ref_out)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_equals_recomputation(family):
    # Every step of generate(use_cache=False) is a prefill of the prompt and the tokens so far, reduced afresh.
    model, inputs = _batch(family, seed=8)
    with vtc.compressed(model, "dycoke"):
        tokens, logits = greedy(model, inputs, steps=4)
        again, logits_again = greedy(model, inputs, steps=4, use_cache=False)
    assert torch.equal(tokens, again)
    torch.testing.assert_close(logits, logits_again, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_drop_equals_mask_where_positions_are_kept(family):
    # Kept positions (Qwen's default; OneVision when asked): survivors in their original order, so the same rows
    # masked out of the unpatched model give the same logits.
    from .reference import reference_logits

    model, inputs = _batch(family, seed=5)
    params = {"positions": "keep"} if family == "llava_onevision" else {}
    logits, stages, embeds, stats = traced(model, inputs, lambda: prefill_logits(model, inputs), "dycoke", **params)
    ref, rows = reference_logits(model, **inputs, stages=stages, vision_embeds=embeds)
    assert_rows_match(logits, ref, rows, inputs["attention_mask"])
    video = [9 + 3 * 2 + 1] if family == "llava_onevision" else [16 + 3 * 4]  # 1 whole frame, 3 cut, 1 dropped
    assert [k.numel() for k in stats.kept["vision"]][-1:] == video


@pytest.mark.parametrize("family", FAMILIES)
def test_image_and_video_batch_equals_single_samples(family):
    model, batch = _batch(family, seed=9)
    singles = split_inputs(model, batch)
    assert "pixel_values_videos" in singles[0] and "pixel_values_videos" not in singles[1]
    batch_equals_single_samples(model, batch, singles, "dycoke", steps=3)


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_exactly(family):
    model, inputs = _batch(family, seed=10)
    attrs = {id(m): set(m.__dict__) for m in model.modules()}
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    before = prefill_logits(model, inputs)
    vtc.apply(model, "dycoke")
    reduced = prefill_logits(model, inputs)
    vtc.remove(model)
    after = prefill_logits(model, inputs)
    assert reduced.shape != before.shape or not torch.equal(reduced, before)
    assert torch.equal(after, before)
    assert {id(m): set(m.__dict__) for m in model.modules()} == attrs
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks


@pytest.mark.parametrize("family", FAMILIES)
def test_images_pass_unchanged(family):
    model = _model(family)
    if family == "llava_onevision":
        inputs = onevision_inputs(model, images=[[(70, 140)], [(70, 70), (140, 70)]], pad=[0, 2], seed=4)
    else:
        inputs = qwen_inputs(model, images=[[(8, 8)], [(4, 8)]], seed=4)
    ref = prefill_logits(model, inputs)
    with vtc.compressed(model, "dycoke", keep_ratio=0.1):
        assert torch.equal(prefill_logits(model, inputs), ref)


@pytest.mark.parametrize("family", ["llava", "llava_next", "internvl"])
def test_families_without_video_refuse(family):
    with pytest.raises(MethodNotApplicableError, match=f"dycoke prunes a video's frames.*{family} takes no video"):
        vtc.plan(tiny_model(family, layers=1, vision_layers=1), "dycoke")


def test_infeasible_budgets_are_refused_with_the_feasible_range():
    model, inputs = _onevision(2, seed=6)
    with pytest.raises(BudgetError, match=r"use a budget in \[0.20, 1\]"):
        vtc.plan(model, "dycoke", budget=0.1)
    with pytest.raises(BudgetError, match="either budget or keep_ratio"):
        vtc.plan(model, "dycoke", budget=0.5, keep_ratio=0.3)
    with pytest.raises(vtc.VtcError, match=r"keep_ratio=1.5 .* in \[0, 1\]"):
        vtc.plan(model, "dycoke", keep_ratio=1.5)
    # Two frames: the first stays whole, so this video keeps at least half of its tokens (and its newline).
    with (vtc.compressed(model, "dycoke", budget=0.3), pytest.raises(
            BudgetError, match=r"keeps 1 of this video's 2 frames whole.*feasible for this video: 10 to 19 tokens")):
        prefill_logits(model, inputs)


@pytest.mark.parametrize("family", FAMILIES)
def test_video_only_batch_equals_single_samples(family):
    # Two samples, each a video alone (OneVision: 4 frames each; Qwen: 3 and 4 temporal groups).
    model = _model(family)
    if family == "llava_onevision":
        batch = onevision_inputs(model, images=[[], []], videos=[[4], [4]], pad=[0, 3], seed=12)
        names = ("pixel_values", "image_sizes", "batch_num_images")
    else:
        batch = qwen_inputs(model, images=[[], []], videos=[[(6, 8, 8)], [(8, 8, 8)]], seed=12)
        names = ("pixel_values", "image_grid_thw")
    singles = split_inputs(model, batch)
    for sample in [batch, *singles]:
        for name in names:
            sample.pop(name, None)
    assert all("pixel_values_videos" in sample for sample in singles)
    with vtc.compressed(model, "dycoke"), torch.no_grad():
        model(**batch)
        kept = [k.numel() for k in vtc.stats(model).kept["vision"]]
    per = 9 if family == "llava_onevision" else 16
    cut = int(0.3 * per)
    # 4 frames: 2 whole, 2 cut (and the newline); 3 groups: 1 whole, 1 cut, 1 dropped.
    assert kept == ([2 * per + 2 * cut + 1] * 2 if family == "llava_onevision" else [per + cut, 2 * per + 2 * cut])
    batch_equals_single_samples(model, batch, singles, "dycoke", steps=3)


@pytest.mark.parametrize("family", FAMILIES)
def test_stats_count_what_entered_the_llm(family):
    """vtc.stats (and a sweep's cost columns) report the tokens that entered, not the plan's count: images pass
    whole, a video keeps what TTM kept of it."""
    model = _model(family)
    if family == "llava_onevision":
        image_only = onevision_inputs(model, images=[[(70, 140)]], seed=5)
        video_only = onevision_inputs(model, images=[[]], videos=[[8]], seed=5)
        video_only.pop("pixel_values", None), video_only.pop("image_sizes", None)
        video_only.pop("batch_num_images", None)
    else:
        image_only = qwen_inputs(model, images=[[(8, 8)]], seed=5)
        video_only = qwen_inputs(model, images=[[]], videos=[[(16, 8, 8)]], seed=5)
        video_only.pop("pixel_values", None), video_only.pop("image_grid_thw", None)
    n_image = int((image_only["input_ids"] == model.config.image_token_id).sum())
    n_video = int((video_only["input_ids"] == model.config.video_token_id).sum())
    full, _ = _lm_call(model, video_only)
    got, _ = _lm_call(model, video_only, "dycoke", keep_ratio=0.3)
    kept = n_video - (full["inputs_embeds"].shape[1] - got["inputs_embeds"].shape[1])
    with vtc.compressed(model, "dycoke", keep_ratio=0.3), torch.no_grad():
        model(**image_only)
        image = vtc.stats(model)
        model(**video_only)
        video = vtc.stats(model)
    assert image.tokens_entering_llm == n_image and image.flops == image.flops_full
    assert kept < n_video and video.tokens_entering_llm == kept and video.flops < video.flops_full
