"""Qwen2.5-VL specifics: 3-D positions kept through decoding, tower signals mapped through the
window order and the 2x2 merger, refusals (no [CLS] token, compact positions), video reduced like images, pool on
each image's own grid.
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


def test_compact_positions_at_layer_stages_are_refused(model):
    for method in ("fastv", "pdrop"):
        with pytest.raises(UnsupportedConfigurationError, match="compact.*positions='keep'"):
            vtc.apply(model, method, budget=0.75, positions="compact")
        assert not vtc.is_applied(model)


def _llm_calls(model):
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append((k["inputs_embeds"], k["position_ids"], k["attention_mask"],
                                     {n: k[n] for n in ("visual_pos_masks", "deepstack_visual_embeds")
                                      if k.get(n) is not None})), with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("method", ["random", "merge"])
def test_compact_positions_remove_the_grid_rows_and_columns_left_empty(model, method):
    # Expected from the kept grid indices alone: an image's survivors take the ranks of their grid rows
    # and columns among the survivors', the image spans max(rows, cols), the text after follows on.
    inputs = qwen_inputs(model, images=[[(8, 12), (12, 8)], [(8, 8), (8, 12)]], pad=[0, 3], seed=8)
    seen, handle = _llm_calls(model)
    try:
        with vtc.compressed(model, method, budget=0.25, positions="compact"), torch.no_grad():
            model(**inputs)
            kept = vtc.stats(model).kept["vision"]
    finally:
        handle.remove()
    pos, mask = seen[0][1], seen[0][2]
    ids = inputs["input_ids"]
    image_runs = [(b, r) for b, r in vtc.ops.runs(ids == model.config.image_token_id)]
    grids = inputs["image_grid_thw"][:, 1:] // 2
    shrank = False
    for b in range(ids.shape[0]):
        expected, cur = [], 0
        real = inputs["attention_mask"][b].bool()
        mine = [(g, r) for g, (s, r) in enumerate(image_runs) if s == b]
        text = (~(ids[b] == model.config.image_token_id) & real).nonzero()[:, 0].tolist()
        events = sorted([(i, None) for i in text] + [(int(r[0]), g) for g, r in mine])
        for _, g in events:
            if g is None:
                expected.append([cur] * 3)
                cur += 1
                continue
            k = kept[g].sort().values
            rows, cols = k // grids[g, 1], k % grids[g, 1]
            rr, cc = torch.unique(rows, return_inverse=True)[1], torch.unique(cols, return_inverse=True)[1]
            expected += [[cur, cur + int(r), cur + int(c)] for r, c in zip(rr, cc)]
            cur += max(int(rr.max()), int(cc.max())) + 1
            shrank |= max(int(rr.max()), int(cc.max())) + 1 < int(grids[g].max())
        valid = mask[b].bool()
        assert pos[-3:, b, valid].T.tolist() == expected
    assert shrank


@pytest.mark.parametrize("loop", [False, True], ids=["generate", "forward-loop"])
def test_compact_decoding_continues_after_the_compacted_prompt(model, loop):
    # Cached decoding equals the unpatched language model run on the reduced prompt with its compacted
    # positions and the new tokens right after them (per sample: the samples drop differently).
    if loop:
        inputs = qwen_inputs(model, images=[[(12, 8)]], seed=4)
    else:
        inputs = qwen_inputs(model, images=[[(8, 12)], [(12, 8)]], pad=[2, 0], seed=4)
    seen, handle = _llm_calls(model)
    try:
        with vtc.compressed(model, "random", budget=0.25, seed=1, positions="compact"), torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0)
            tokens, logits = out.sequences[:, inputs["input_ids"].shape[1]:], list(out.logits)
            if loop:  # no position_ids, no mask: the adapter numbers the steps
                first = model(**{k: v for k, v in inputs.items() if k != "attention_mask"}, use_cache=True)
                logits, cache = [first.logits[:, -1]], first.cache
                for t in range(2):
                    step = model(input_ids=tokens[:, t: t + 1], cache=cache, use_cache=True)
                    logits.append(step.logits[:, -1])
                    cache = step.cache
    finally:
        handle.remove()
    embeds, pos, mask, deepstack = seen[0]  # deepstack: Qwen3-VL's DeepStack arguments, added at visual rows
    spatial = pos[-3:]
    end = spatial.amax(dim=(0, 2)) + 1
    full_end = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                          image_grid_thw=inputs["image_grid_thw"],
                                          attention_mask=inputs["attention_mask"])[0].amax(dim=(0, 2)) + 1
    assert bool((end < full_end).all())
    lm = model.model.language_model
    with torch.no_grad():
        for t in range(3):
            e = torch.cat([embeds, lm.embed_tokens(tokens[:, :t])], dim=1)
            p = torch.cat([spatial, (end[:, None] + torch.arange(t))[None].expand(3, -1, -1)], dim=2)
            m = torch.cat([mask, torch.ones_like(tokens[:, :t])], dim=1)
            extra = dict(deepstack)
            if extra:  # the new tokens are no visual rows
                extra["visual_pos_masks"] = torch.cat([extra["visual_pos_masks"], torch.zeros_like(m[:, :t]).bool()], 1)
            h = lm(inputs_embeds=e, position_ids=p, attention_mask=m, **extra).last_hidden_state
            torch.testing.assert_close(logits[t], model.lm_head(h)[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["vtc_cls", "hired", "tome"])
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


VIDEO_CASES = [("random", {"budget": 0.5, "seed": 1}), ("merge", {"budget": 0.4}), ("fastv", {"budget": 0.6}),
               ("pdrop", {"budget": 0.5}), ("visionzip", {"budget": 0.5}),
               ("divprune", {"budget": 0.3}), ("pool", {"budget": 0.25}),
               ("random+fastv", {"budget": 0.6, "seed": 2, "fastv.layer": 1}),
               ("vispruner", {"budget": 0.4}), ("cdpruner", {"budget": 0.4}), ("aim", {"budget": 0.4}),
               ("dart", {"budget": 0.6, "pivot_image": 2, "pivot_text": 2}),
               ("sparsevlm", {"budget": 0.5, "recycle": False})]
VIDEO_IDS = [c[0] for c in VIDEO_CASES]


def _video_batch(model, seed=5):
    """Two padded samples: an image, then a 4-frame video (2 temporal groups); a smaller image alone."""
    return qwen_inputs(model, images=[[(8, 8)], [(4, 8)]], videos=[[(4, 8, 8)], []], seed=seed)


def _args(case):
    """``(method, params)`` of a video case for ``vtc.apply``."""
    method, params = case
    return (method.split("+") if "+" in method else method), params


def _apply(model, case):
    method, params = _args(case)
    vtc.apply(model, method, **params)


@pytest.mark.parametrize("case", VIDEO_CASES, ids=VIDEO_IDS)
def test_video_full_budget_is_identity(model, case):
    inputs = qwen_inputs(model, images=[[(4, 4)]], videos=[[(2, 8, 8)]], seed=3)
    with torch.no_grad():
        ref = model(**inputs).logits
    ref_out = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    method, params = case
    with vtc.compressed(model, method.split("+") if "+" in method else method, **{**params, "budget": 1.0}):
        with torch.no_grad():
            logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(logits, ref) and torch.equal(out, ref_out)


@pytest.mark.parametrize("case", VIDEO_CASES, ids=VIDEO_IDS)
def test_video_drop_equals_mask(model, case):
    # The video's rows are reduced like the images': one entry of 2 groups x 16 tokens, frames jointly.
    from .reference import reference_logits
    from .test_equivalence import assert_rows_match, prefill_logits, traced

    inputs = _video_batch(model)
    method, params = _args(case)
    logits, stages, embeds, stats = traced(model, inputs, lambda: prefill_logits(model, inputs), method, **params)
    ref, rows = reference_logits(model, **inputs, stages=stages, vision_embeds=embeds)
    assert_rows_match(logits, ref, rows, inputs["attention_mask"])
    assert stats.images == 2  # the first sample's image and video
    last = list(stats.kept.values())[-1]
    assert len(last) == 3 and last[2].numel() < 32


@pytest.mark.parametrize("case", VIDEO_CASES[:4], ids=VIDEO_IDS[:4])
def test_video_cached_generation_equals_recomputation(model, case):
    from .reference import reference_logits
    from .test_equivalence import greedy, traced

    inputs = _video_batch(model, seed=8)
    method, params = _args(case)
    (tokens, step_logits), stages, embeds, _ = traced(
        model, inputs, lambda: greedy(model, inputs, steps=3), method, **params)
    extra = {k: inputs[k] for k in ("image_grid_thw", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw")}
    for t in range(tokens.shape[1]):
        ids = torch.cat([inputs["input_ids"], tokens[:, :t]], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(tokens[:, :t])], dim=1)
        ref, _ = reference_logits(model, ids, mask, inputs["pixel_values"], stages, vision_embeds=embeds,
                                  prompt=inputs["input_ids"].shape[1], **extra)
        torch.testing.assert_close(step_logits[:, t], ref[:, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", VIDEO_CASES, ids=VIDEO_IDS)
def test_image_and_video_batch_equals_single_samples(model, case):
    from vtc.testing import split_inputs

    from .test_equivalence import batch_equals_single_samples

    batch = _video_batch(model, seed=9)
    singles = split_inputs(model, batch)
    assert "pixel_values_videos" in singles[0] and "pixel_values_videos" not in singles[1]
    method, params = _args(case)
    batch_equals_single_samples(model, batch, singles, method, steps=3, **params)


@pytest.mark.parametrize("case", VIDEO_CASES, ids=VIDEO_IDS)
def test_video_remove_restores_exactly(model, case):
    inputs = _video_batch(model, seed=10)
    attrs = {id(m): set(m.__dict__) for m in model.modules()}
    with torch.no_grad():
        before = model(**inputs).logits
    _apply(model, case)
    with torch.no_grad():
        reduced = model(**inputs).logits
    vtc.remove(model)
    with torch.no_grad():
        after = model(**inputs).logits
    assert reduced.shape != before.shape or not torch.equal(reduced, before)
    assert torch.equal(after, before)
    assert {id(m): set(m.__dict__) for m in model.modules()} == attrs


def test_video_alone_is_reduced_and_compact_refused(model):
    inputs = qwen_inputs(model, images=[[]], videos=[[(4, 8, 8)]], seed=11)
    del inputs["pixel_values"], inputs["image_grid_thw"]
    with vtc.compressed(model, "random", budget=0.5, seed=0), torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert vtc.stats(model).images == 1
    assert logits.shape[1] == inputs["input_ids"].shape[1] - 16  # the video's 32 tokens -> 16
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    with (vtc.compressed(model, "random", budget=0.5, seed=0, positions="compact"), torch.no_grad(),
          pytest.raises(UnsupportedConfigurationError, match="video")):
        model(**inputs)


def test_cli_plans_on_the_qwen_shape(capsys):
    from vtc.cli import main

    assert main(["plan", "--model", "qwen2.5-vl-shape", "--method", "pdrop", "--budget", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "1024 visual tokens per image, 28 layers" in out and "keep" in out
    assert main(["plan", "--model", "qwen2.5-vl-shape", "--method", "vtc_cls"]) == 2


@pytest.mark.parametrize("method", ["random", "merge", "random+pdrop"])
def test_compact_batch_of_different_images_equals_single_samples(model, method):
    from vtc.testing import split_inputs

    from .conftest import greedy

    batch = qwen_inputs(model, images=[[(8, 12)], [(8, 8), (12, 8)]], pad=[3, 0], seed=9)
    params = {"random.positions": "compact", "pdrop.positions": "keep"} if "+" in method else {"positions": "compact"}
    with vtc.compressed(model, method, budget=0.3, **params):
        tokens, logits = greedy(model, batch)
        for b, alone in enumerate(split_inputs(model, batch)):
            tokens_b, logits_b = greedy(model, alone)
            assert torch.equal(tokens_b[0], tokens[b])
            torch.testing.assert_close(logits_b[0], logits[b], atol=1e-5, rtol=1e-5)


def _generate(model, **kw):
    out = model.generate(**kw, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0)
    return out, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("params", [{"budget": 0.3, "seed": 1}, {"budget": 0.3, "seed": 1, "positions": "compact"}],
                         ids=["keep", "compact"])
@pytest.mark.parametrize("batch", [1, 2])
def test_chat_over_pruned_cache_equals_fresh_run(model, params, batch):
    # Turn 2 over turn 1's cache (the new ids only by their mask, as a user continues a chat) equals a fresh
    # run of the whole conversation with its image reduced the same way.
    inputs = qwen_inputs(model, images=[[(8, 12)], [(12, 8)]][:batch], pad=[0, 2][:batch], seed=11)
    with vtc.compressed(model, "random", **params):
        first, _ = _generate(model, **inputs)
        turn2 = torch.randint(3, 100, (batch, 5), generator=torch.Generator().manual_seed(1))
        conv = torch.cat([first.sequences, turn2], dim=1)
        extra = conv.shape[1] - inputs["input_ids"].shape[1]
        mask = torch.cat([inputs["attention_mask"], torch.ones(batch, extra, dtype=torch.long)], dim=1)
        continued, logits = _generate(model, input_ids=conv, attention_mask=mask, cache=first.cache)
        types = torch.cat([inputs["mm_token_type_ids"], torch.zeros(batch, extra, dtype=torch.long)], dim=1)
        fresh, fresh_logits = _generate(model, input_ids=conv, attention_mask=mask, mm_token_type_ids=types,
                                        pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    torch.testing.assert_close(logits, fresh_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(continued.sequences, fresh.sequences)


@pytest.mark.parametrize("method", ["random", "fastv"])
def test_beam_search_and_several_returns(model, method):
    inputs = qwen_inputs(model, images=[[(8, 12)], [(8, 8)]], pad=[0, 2], seed=5)
    with vtc.compressed(model, method, budget=0.75):
        out = model.generate(**inputs, max_new_tokens=3, num_beams=3, num_return_sequences=2, do_sample=False,
                             pad_token_id=0)
        assert vtc.stats(model).equivalent_tokens < vtc.stats(model).image_tokens
    assert out.shape == (4, inputs["input_ids"].shape[1] + 3)


def test_received_attention_equals_the_towers_eager_attention(model):
    # The signal visionzip ranks dominant patches by: per merged token, the attention its four patches
    # receive at the last full-attention block, averaged over heads and over the queries of the image;
    # checked against the probabilities transformers' eager attention computes from the same inputs.
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision, eager_attention_forward

    inputs = qwen_inputs(model, images=[[(8, 12), (12, 8)]], seed=2)
    layer = get_adapter(model).info().received_layer
    assert layer == model.config.vision_config.depth - 1
    module = model.model.visual.blocks[layer].attn
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a, k: seen.append((a[0], k)), with_kwargs=True)
    try:
        with vtc.compressed(model, "visionzip", budget=0.5), torch.no_grad():
            out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            signals = out.vtc_signals
    finally:
        handle.remove()
    hidden, kwargs = seen[0]
    n = hidden.shape[0]
    q, k, v = module.qkv(hidden).reshape(n, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *kwargs["position_embeddings"])
    bounds = kwargs["cu_seqlens"].tolist()
    received = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        _, probs = eager_attention_forward(module, *(t[a:b].transpose(0, 1)[None] for t in (q, k, v)),
                                           attention_mask=None, scaling=module.scaling)
        received.append(probs[0].mean(dim=(0, 1)))
    expected = get_adapter(model).patch_tokens(torch.cat(received), {"image_grid_thw": inputs["image_grid_thw"]})
    got = [sig[f"recv{(layer,)}"] for _, sig in signals["entries"]]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e.float(), atol=1e-6, rtol=1e-5)
    assert vtc.plan(model, "visionzip", budget=0.5).stages[0].scorer.kind == "received_attention"



def pool_check(model, positions):
    """Images of 4x4 and 4x6 merged tokens and (positions kept) a video of two 4x4 groups, pooled to a quarter
    of their tokens: every grid pools 2x2 blocks (4x4 -> 2x2, 4x6 -> 2x3, each temporal group alone). Each pooled
    token is the mean of its block, kept at the block's token (1, 1) and (kept positions) its 3-D position; under
    compact positions each image spans a 2x2 or 2x3 grid. Returns the LLM's input and the inputs."""
    import torch.nn.functional as F

    from .reference import survivors

    videos = [[(4, 8, 8)], []] if positions == "keep" else None
    inputs = qwen_inputs(model, images=[[(8, 8)], [(8, 12)]], videos=videos, pad=[0, 2], seed=4)
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k) if not seen else None, with_kwargs=True)
    try:
        with vtc.compressed(model, "pool", budget=0.25, positions=positions), torch.no_grad():
            model(**inputs)
            plan, kept = model._vtc.plan, vtc.stats(model).kept
    finally:
        handle.remove()
    with torch.no_grad():
        entries = list(model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
        grids = inputs["image_grid_thw"].tolist()
        if videos:
            entries += list(model.model.get_video_features(inputs["pixel_values_videos"],
                                                           inputs["video_grid_thw"]).pooler_output)
            grids += inputs["video_grid_thw"].tolist()
    pooled = []
    for g, (entry, (t, h, w)) in enumerate(zip(entries, grids)):
        grid = entry.view(t, h // 2, w // 2, -1).permute(0, 3, 1, 2)
        pooled.append(F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2).reshape(-1, entry.shape[-1]))
        r, c = torch.meshgrid(torch.arange(1, h // 2, 2), torch.arange(1, w // 2, 2), indexing="ij")
        centers = torch.arange(t)[:, None] * (h // 2) * (w // 2) + (r * (w // 2) + c).flatten()
        assert torch.equal(kept["vision"][g], centers.flatten())
    (_, rows, _), = survivors(model, inputs["input_ids"], plan, kept, inputs.get("video_grid_thw"))
    ids, llm = inputs["input_ids"], seen[0]
    full, _ = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
                                         video_grid_thw=inputs.get("video_grid_thw"),
                                         attention_mask=inputs["attention_mask"])
    mine = {0: [0, 2] if videos else [0], 1: [1]}  # each sample's entries in prompt order
    for b, r in enumerate(rows):
        visual = (ids[b, r] == model.config.image_token_id) | (ids[b, r] == model.config.video_token_id)
        got = llm["inputs_embeds"][b, -r.numel():][visual]
        torch.testing.assert_close(got, torch.cat([pooled[g] for g in mine[b]]), atol=1e-5, rtol=1e-5)
        pos = llm["position_ids"][-3:, b, -r.numel():]
        if positions == "keep":
            assert torch.equal(pos, full[:, b, r])
        else:
            image = pos[:, visual & (ids[b, r] == model.config.image_token_id)]
            assert sorted({len(set(image[1].tolist())), len(set(image[2].tolist()))}) == ([2] if b == 0 else [2, 3])
    return llm, inputs, rows


@pytest.mark.parametrize("positions", ["keep", "compact"])
def test_pool_averages_each_grid_to_its_share(model, positions):
    pool_check(model, positions)
