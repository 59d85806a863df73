"""Bad input gets a clear error naming what is wrong and what is allowed, and loses nothing."""

from __future__ import annotations

import pytest
from torch import nn

import vtc
from vtc.testing import tiny_inputs


def test_unknown_method_lists_available(model):
    listed = "unknown method .fastvv.*available methods: aim, .*dart, divprune, .*fastv, "
    with pytest.raises(vtc.UnknownMethodError, match=listed):
        vtc.apply(model, "fastvv")
    assert not vtc.is_applied(model)


def test_unknown_parameter_lists_parameters(model):
    with pytest.raises(vtc.VtcError, match="no parameter.*lyer.*its parameters: layer, keep"):
        vtc.apply(model, "fastv", lyer=3)


def test_unsupported_model_lists_supported():
    with pytest.raises(vtc.UnsupportedModelError, match="no adapter for Linear.*supported: LlavaFor"):
        vtc.apply(nn.Linear(2, 2), "fastv")


@pytest.mark.parametrize(
    ("method", "budget", "message"),
    [
        ("vtc_cls", 0, "keeps no visual token"),
        ("vtc_cls", -3, "keeps no visual token"),
        ("vtc_cls", 0.0, "must be in \\(0, 1\\]"),
        ("fastv", 17, "above the model's 16 visual tokens per image; use at most 16"),
        ("random", 1.5, "must be in \\(0, 1\\]"),
        ("vtc_cls", "64", "must be an int"),
        ("fastv", 5, "cannot reach budget 5: the lowest feasible budget is 6.0 tokens"),
    ],
)
def test_infeasible_budget(model, method, budget, message):
    with pytest.raises(vtc.BudgetError, match=message):
        vtc.apply(model, method, budget=budget)
    assert not vtc.is_applied(model)


def test_budget_and_keep_together_is_refused(model):
    with pytest.raises(vtc.BudgetError, match="either budget or keep"):
        vtc.plan(model, "vtc_cls", budget=8, keep=4)


def test_fastv_layer_out_of_range(model):
    with pytest.raises(vtc.VtcError, match="fastv layer=6: use a layer in \\[1, 5\\]"):
        vtc.plan(model, "fastv", layer=6)


def test_vtc_cls_layer_out_of_range(model):
    with pytest.raises(vtc.VtcError, match="vtc_cls layers \\[1, 4\\].*vision layer in \\[0, 3\\]"):
        vtc.plan(model, "vtc_cls", layers=(1, 4))


def test_vtc_cls_needs_cls_token():
    from vtc.methods.vtc_cls import VtcCls

    info = vtc.ModelInfo("qwen2_vl", 256, 28, 32, 31, has_cls=False)
    # No received-attention layer either: the alternatives named are the methods that need no tower signal.
    with pytest.raises(vtc.VtcError, match="no \\[CLS\\] token; use fastv, pdrop, random, merge or divprune$"):
        VtcCls().compile(info, 64)


def test_static_cache_is_refused(model):
    inputs = tiny_inputs(model)
    vtc.apply(model, "fastv")
    with pytest.raises(vtc.UnsupportedConfigurationError, match="static.*dynamic cache"):
        model.generate(**inputs, max_new_tokens=2, cache_implementation="static", pad_token_id=0)
    vtc.remove(model)
    model.generation_config.cache_implementation = "static"
    try:
        with pytest.raises(vtc.UnsupportedConfigurationError, match="cache_implementation='static'"):
            vtc.apply(model, "fastv")
        assert not vtc.is_applied(model)
    finally:
        model.generation_config.cache_implementation = None


def test_stats_before_any_forward(model):
    with vtc.compressed(model, "fastv"), pytest.raises(vtc.VtcError, match="has not run a forward"):
        vtc.stats(model)


def test_drifted_signature_is_refused(model, monkeypatch):
    from vtc.patches import base

    monkeypatch.setattr(base.Adapter, "forward_params", (*base.Adapter.forward_params, "cache_position"))
    with pytest.raises(vtc.UnsupportedConfigurationError, match="no longer takes \\['cache_position'\\]"):
        vtc.apply(model, "vtc_cls")
    assert not vtc.is_applied(model)
    assert "forward" not in model.model.__dict__


def test_from_pretrained_checks_method_before_loading(tmp_path):
    with pytest.raises(vtc.UnknownMethodError):
        vtc.from_pretrained(str(tmp_path / "does-not-exist"), method="nope")


def test_drifted_decoder_layer_is_refused(model, monkeypatch):
    from vtc.patches import decoder

    monkeypatch.setattr(decoder, "LAYER_KWARGS", (*decoder.LAYER_KWARGS, "cache_position"))
    with pytest.raises(vtc.UnsupportedConfigurationError, match="no parameter.*cache_position"):
        vtc.apply(model, "fastv")
    assert not vtc.is_applied(model) and "forward" not in model.model.__dict__
    assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)


def test_pdrop_budget_below_reach_names_the_lowest(model):
    with pytest.raises(vtc.BudgetError, match="pdrop with layers \\[3, 4\\].*lowest feasible budget is 8.5 tokens"):
        vtc.plan(model, "pdrop", budget=5, layers=(3, 4))
    with pytest.raises(vtc.VtcError, match="strictly increasing layers in \\[1, 5\\]"):
        vtc.plan(model, "pdrop", layers=(3, 3))


def test_composition_errors(model):
    with pytest.raises(vtc.VtcError, match="no pre-LLM stage to compose"):
        vtc.plan(model, "fastv+pdrop", budget=8)
    with pytest.raises(vtc.VtcError, match="reduces before the LLM"):
        vtc.plan(model, "vtc_cls+random", budget=8)
    with pytest.raises(vtc.VtcError, match="belongs to both methods: prefix it"):
        vtc.plan(model, "vtc_cls+fastv", budget=8, keep=4)
    with pytest.raises(vtc.VtcError, match="exactly two methods"):
        vtc.plan(model, "vtc_cls+pdrop+fastv", budget=8)


def test_psigmoid_budget_below_reach(model):
    with pytest.raises(vtc.BudgetError, match="psigmoid keeps all.*lowest feasible budget is 2.8 tokens"):
        vtc.plan(model, "psigmoid", budget=2, r_min=0.01)
