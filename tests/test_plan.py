"""Plans, budgets and the token/FLOPs accounting."""

from __future__ import annotations

import pytest
import torch

import vtc
from vtc.flops import layer_flops, prefill_flops
from vtc.plan import ModelInfo, Plan, Scorer, Stage
from vtc.registry import get_method

LLAVA15 = ModelInfo("llava", 576, 32, 24, 22, True, hidden_size=4096, intermediate_size=11008,
                    num_heads=32, num_kv_heads=32, head_dim=128)


@pytest.mark.parametrize("method", ["fastv", "vtc_cls", "random"])
@pytest.mark.parametrize("budget", [576, 192, 128, 64, 0.5, 0.25])
def test_budget_is_met_within_rounding(method, budget):
    if method == "fastv" and budget == 64:
        pytest.skip("below fastv's reach at layer 2 (checked in test_errors)")
    plan = get_method(method).create().compile(LLAVA15, budget)
    target = budget if isinstance(budget, int) else budget * 576
    assert abs(plan.equivalent_tokens - target) <= 0.5


def test_defaults_follow_the_papers():
    assert get_method("fastv").create().compile(LLAVA15).stages[0].keep == 288
    assert get_method("fastv").create().compile(LLAVA15).stages[0].where == "layer:2"
    # VTC-CLS official `--layer 16`: attentions[16:-1], layers 16..22 of 24.
    assert get_method("vtc_cls").create().compile(LLAVA15).stages[0].scorer.layers == tuple(range(16, 23))


def test_plan_rejects_malformed_stages():
    s = Scorer("random")
    with pytest.raises(ValueError, match="before layer stages"):
        Plan("x", (Stage("layer:2", s, 8), Stage("vision", s, 4)), 16, 6)
    with pytest.raises(ValueError, match="strictly increasing"):
        Plan("x", (Stage("layer:3", s, 8), Stage("layer:2", s, 4)), 16, 6)
    with pytest.raises(ValueError, match="only 8 reach it"):
        Plan("x", (Stage("layer:2", s, 8), Stage("layer:3", s, 9)), 16, 6)
    with pytest.raises(ValueError, match="layer in \\[1, 5\\]"):
        Plan("x", (Stage("layer:6", s, 8),), 16, 6)
    with pytest.raises(ValueError, match="'vision' or 'layer:<i>'"):
        Stage("llm", s, 8)


def test_flops_match_the_per_layer_counts():
    plan = get_method("fastv").create(keep=0.5).compile(LLAVA15)
    text = 64
    expected = 2 * layer_flops(LLAVA15, text + 576) + 30 * layer_flops(LLAVA15, text + 288)
    got = prefill_flops(LLAVA15, plan, text, images=1)
    assert expected < got < expected * 1.01  # plus the scoring: one key projection, under 1%
    # FastV's paper: K=2, R=50% on LLaVA-1.5-7B saves about 45% of the prefill FLOPs.
    assert 0.5 < got / prefill_flops(LLAVA15, None, text, 1) < 0.6


def test_stats_report_what_the_forward_did(model):
    from vtc.testing import tiny_inputs

    inputs = tiny_inputs(model, images=2)
    with vtc.compressed(model, "fastv", budget=10), torch.no_grad():
        out = model(**inputs, use_cache=True)
        stats = vtc.stats(model)
    plan = vtc.plan(model, "fastv", budget=10)
    assert stats.images == 2 and stats.tokens_entering_llm == 16
    assert stats.tokens_per_layer == plan.tokens_per_layer()
    text = inputs["input_ids"].shape[1] - 32
    lengths = [layer.keys.shape[2] for layer in out.cache.layers]
    assert lengths == [text + 2 * n for n in stats.tokens_per_layer]
    assert [k.shape for k in stats.kept["layer:2"]] == [(plan.stages[0].keep,)] * 2
    assert 0 < stats.flops_ratio < 1 and "fastv" in str(stats)


def test_pdrop_defaults_and_budget_solving():
    plan = get_method("pdrop").create().compile(LLAVA15)
    assert [s.where for s in plan.stages] == ["layer:8", "layer:16", "layer:24"]
    assert [s.keep for s in plan.stages] == [288, 144, 72] and plan.stages[0].positions == "compact"
    assert plan.stages[0].scorer.layers == (8,)  # scored with the stage layer's own modules
    low = get_method("pdrop").create().compile(LLAVA15, 64)
    assert low.stages[0].where == "layer:2" and abs(low.equivalent_tokens - 64) < 1


def test_composed_plan_splits_the_budget():
    from vtc.methods.composed import create_method

    plan = create_method("vtc_cls+pdrop", {}).compile(LLAVA15, 64)
    assert plan.method == "vtc_cls+pdrop" and plan.tokens_entering_llm == 128
    assert abs(plan.equivalent_tokens - 64) < 1
    own = create_method(["vtc_cls", "pdrop"], {"vtc_cls.keep": 96}).compile(LLAVA15, 64)
    assert own.tokens_entering_llm == 96


def test_registry_scans_every_method_even_after_one_was_imported():
    import subprocess
    import sys

    code = "import vtc.methods.pool, vtc; print(','.join(vtc.list_methods()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert {"fastv", "pdrop", "vtc_cls", "pool"} <= set(out.strip().split(","))
