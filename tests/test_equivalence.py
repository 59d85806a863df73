"""The core matrix: every registered method, under sdpa and eager, on tiny LLaVA models."""

from __future__ import annotations

import pytest
import torch

import vtc
from vtc.registry import get_adapter
from vtc.testing import join_inputs, split_inputs, tiny_inputs

from .conftest import (
    BACKENDS,
    FAMILIES,
    MERGES_IN_LLM,
    applies,
    case_args,
    case_kwargs,
    greedy,
    method_cases,
    use_model,
)
from .reference import reference_logits, survivors

CASES = method_cases()
# Cases a mask over the prompt's rows can reproduce (merged tokens made inside the LLM have no such rows).
MASKABLE = [c for c in CASES if c not in MERGES_IN_LLM]


def pytest_generate_tests(metafunc):
    """The matrix: every backend and model family, with every case (or those a test's
    ``cases`` mark names) that applies to it."""
    if "model" not in metafunc.fixturenames:
        return
    backends = BACKENDS + FAMILIES
    if "case" not in metafunc.fixturenames:
        metafunc.parametrize("model", backends, ids=["-".join(b) for b in backends], indirect=True)
        return
    marker = metafunc.definition.get_closest_marker("cases")
    pairs = [(b, c) for b in backends for c in (marker.args[0] if marker else CASES) if applies(b, c)]
    metafunc.parametrize(("model", "case"), pairs, ids=[f"{'-'.join(b)}-{c}" for b, c in pairs], indirect=["model"])


@pytest.fixture
def model(request):
    yield from use_model(request)


def full_budget(model) -> int:
    """The plan's image size: every image, whatever its size, keeps all of its tokens."""
    return get_adapter(model).info().image_tokens


@pytest.mark.cases([c for c in CASES if c not in ("schedule", "gsearch")])  # no budget
def test_full_budget_is_identity(model, inputs, case):
    method, params = case_args(model, case)
    params = {k: v for k, v in params.items() if k not in ("budget", "keep", "ratio", "merged", "slope")}
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    ref_tokens, _ = greedy(model, inputs)
    with vtc.compressed(model, method, budget=full_budget(model), **params):
        with torch.no_grad():
            logits = model(**inputs).logits
        tokens, _ = greedy(model, inputs)
        assert vtc.stats(model).equivalent_tokens == vtc.stats(model).image_tokens
        assert vtc.stats(model).flops_ratio == 1.0  # skipped stages cost no scoring
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)


def llm_inputs(model):
    """Record the embeddings the language model receives (first call: the prefill); with DeepStack features
    (Qwen3-VL), a dict of them, ``visual_pos_masks`` and ``deepstack_visual_embeds``."""
    seen = []

    def record(m, a, k):
        if not seen:
            deep = {n: k[n] for n in ("visual_pos_masks", "deepstack_visual_embeds") if k.get(n) is not None}
            seen.append({"inputs_embeds": k["inputs_embeds"], **deep} if deep else k["inputs_embeds"])

    handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    return seen, handle


def traced(model, inputs, run, method, **params):
    """``run()`` under ``method``, with what the LLM received and each stage's survivors:
    ``(run's result, stages, LLM prefill embeddings, stats)``; the model is restored after."""
    vtc.apply(model, method, **params)
    seen, handle = llm_inputs(model)
    try:
        result = run()
        stats, plan = vtc.stats(model), model._vtc.plan
    finally:
        handle.remove()
        vtc.remove(model)
    stages = survivors(model, inputs["input_ids"], plan, stats.kept, inputs.get("video_grid_thw"))
    return result, stages, seen[0], stats


def assert_rows_match(logits, ref, rows, attention_mask):
    """The physically reduced logits equal the reference's rows ``rows`` of each sample."""
    assert logits.shape[1] == max(r.numel() for r in rows), "physical drop left a different number of rows"
    for b, r in enumerate(rows):
        # A sample that kept fewer rows than another is left-padded.
        real = attention_mask[b, r].bool()
        got = logits[b, logits.shape[1] - r.numel():]
        torch.testing.assert_close(got[real], ref[b, r][real], atol=1e-5, rtol=1e-5)


def prefill_logits(model, inputs, **extra):
    with torch.no_grad():
        return model(**inputs, **extra).logits


def _check_against_reference(model, inputs, case, position_ids=None):
    method, params = case_args(model, case)
    logits, stages, embeds, stats = traced(
        model, inputs, lambda: prefill_logits(model, inputs, position_ids=position_ids), method, **params)
    ref, rows = reference_logits(model, **inputs, stages=stages, position_ids=position_ids, vision_embeds=embeds)
    assert_rows_match(logits, ref, rows, inputs["attention_mask"])
    return stats


@pytest.mark.cases(MASKABLE)
def test_drop_equals_mask(model, inputs, case):
    stats = _check_against_reference(model, inputs, case)
    assert stats.equivalent_tokens < stats.image_tokens


@pytest.mark.cases(MASKABLE)
def test_drop_equals_mask_two_images_padded(model, case):
    inputs = tiny_inputs(model, batch=2, images=2, pad=[0, 3], seed=1)
    pos = (inputs["attention_mask"].cumsum(1) - 1).clamp_min(0)
    stats = _check_against_reference(model, inputs, case, position_ids=pos)
    assert stats.images == 2
    assert all(len(v) == 4 for v in stats.kept.values())  # two samples of two images


@pytest.mark.cases(MASKABLE)  # recycling: tests/test_sparsevlm.py
def test_cached_generation_equals_recomputation(model, case):
    inputs = tiny_inputs(model, batch=2, pad=[2, 0], seed=2)
    (tokens, step_logits), stages, embeds, _ = traced(
        model, inputs, lambda: greedy(model, inputs, steps=4), **case_kwargs(model, case))
    for t in range(tokens.shape[1]):
        ids = torch.cat([inputs["input_ids"], tokens[:, :t]], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(tokens[:, :t])], dim=1)
        pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 0)
        image_inputs = {k: v for k, v in inputs.items() if k in ("image_sizes", "image_grid_thw", "mm_token_type_ids")}
        if "image_grid_thw" in inputs:
            pos = None  # Qwen2.5-VL: the reference computes the model's own 3-D positions
        ref, _ = reference_logits(model, ids, mask, inputs["pixel_values"], stages, position_ids=pos,
                                  vision_embeds=embeds, prompt=inputs["input_ids"].shape[1], **image_inputs)
        torch.testing.assert_close(step_logits[:, t], ref[:, -1], atol=1e-4, rtol=1e-4)
        assert torch.equal(ref[:, -1].argmax(-1), tokens[:, t])


def batch_equals_single_samples(model, batch, singles, method, steps: int = 5, **params):
    """Greedy generation on a padded batch gives each sample what it gives alone (``method`` applied)."""
    vtc.apply(model, method, **params)
    try:
        tokens, logits = greedy(model, batch, steps=steps)
        for b, alone in enumerate(singles):
            tokens_b, logits_b = greedy(model, alone, steps=steps)
            assert torch.equal(tokens_b[0], tokens[b])
            torch.testing.assert_close(logits_b[0], logits[b], atol=1e-5, rtol=1e-5)
    finally:
        vtc.remove(model)


def test_padded_batch_equals_single_samples(model, case):
    batch = tiny_inputs(model, batch=2, pad=[3, 0], seed=4)
    batch_equals_single_samples(model, batch, split_inputs(model, batch), **case_kwargs(model, case))


@pytest.mark.parametrize("text", [12, 28], ids=["padded", "unpadded"])
def test_batch_of_samples_with_different_image_counts(model, case, text):
    # The samples keep different numbers of rows: the shorter is padded at every stage. With
    # 28 text tokens the prompts are equally long: there is no padding, and no mask, to start from.
    one, two = tiny_inputs(model, images=1, text=text, seed=6), tiny_inputs(model, images=2, seed=7)
    batch = join_inputs([one, two])
    batch_equals_single_samples(model, batch, [one, two], **case_kwargs(model, case))


def test_prompt_without_image_is_unchanged(model, case):
    ids = torch.randint(3, model.config.image_token_id, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with vtc.compressed(model, **case_kwargs(model, case)):
            out = model(input_ids=ids).logits
            assert vtc.stats(model).images == 0
    assert torch.equal(out, ref)


def test_remove_restores_exactly(model, inputs, case):
    keys = set(model.state_dict())
    attrs = {id(m): set(m.__dict__) for m in model.modules()}
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    with torch.no_grad():
        before = model(**inputs).logits
    vtc.apply(model, **case_kwargs(model, case))
    with torch.no_grad():
        reduced = model(**inputs).logits
    vtc.remove(model)
    with torch.no_grad():
        after = model(**inputs).logits
    assert reduced.shape != before.shape or not torch.equal(reduced, before)
    assert torch.equal(after, before)
    assert set(model.state_dict()) == keys
    assert {id(m): set(m.__dict__) for m in model.modules()} == attrs
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks
    assert not vtc.is_applied(model)


def test_apply_twice_is_refused(model):
    vtc.apply(model, "fastv")
    with pytest.raises(vtc.VtcError, match="already applied.*vtc.remove"):
        vtc.apply(model, "vtc_cls")
    vtc.remove(model)
    with pytest.raises(vtc.VtcError, match="nothing to remove"):
        vtc.remove(model)


@pytest.mark.cases(["fastv", "vtc_cls"])
def test_beam_search_and_several_returns(model, case):
    inputs = tiny_inputs(model, batch=2, pad=[0, 2], seed=5)
    with vtc.compressed(model, **case_kwargs(model, case)):
        out = model.generate(**inputs, max_new_tokens=3, num_beams=3, num_return_sequences=2, do_sample=False,
                             pad_token_id=0)
        assert vtc.stats(model).equivalent_tokens < vtc.stats(model).image_tokens
    assert out.shape == (4, inputs["input_ids"].shape[1] + 3)


def test_from_pretrained_applies_and_routes_parameters(tmp_path):
    from vtc.testing import tiny_llava

    tiny_llava().save_pretrained(tmp_path)
    model = vtc.from_pretrained(str(tmp_path), method="fastv", layer=3, keep=4, dtype=torch.float32)
    assert vtc.is_applied(model)
    assert model.__dict__["_vtc"].plan.stages[0].where == "layer:3"
    assert model.dtype == torch.float32 and not model.training


def test_vision_tower_runs_once_per_prefill(model, inputs, case):
    calls = []
    tower = getattr(model.model, "vision_tower", None) or model.model.visual
    handle = tower.register_forward_hook(lambda *_: calls.append(1))
    try:
        with vtc.compressed(model, **case_kwargs(model, case)):
            with torch.no_grad():
                model(**inputs)
            assert len(calls) == 1
            greedy(model, inputs, steps=2)
            assert len(calls) == 2
    finally:
        handle.remove()


@pytest.mark.cases(["fastv", "aim"])
def test_scoring_at_an_earlier_layer_reuses_its_projections(model, inputs, case):
    # FastV and AIM score a stage with the previous layer's attention: its own q/k projections
    # are captured, not computed a second time.
    stage = vtc.plan(model, **case_kwargs(model, case)).layer_stages[-1]
    k_proj = model.model.language_model.layers[stage.scorer.layers[0]].self_attn.k_proj
    calls = []
    handle = k_proj.register_forward_hook(lambda *_: calls.append(1))
    try:
        with vtc.compressed(model, **case_kwargs(model, case)), torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    assert len(calls) == 1
