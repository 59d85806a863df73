"""ToMe merges inside the vision tower as the official code does: vtc's LLM input is compared
with a reference written from facebookresearch/ToMe (commit af95e4b), run on the unpatched
tiny LLaVA-1.5-shaped models' own weights.

The reference follows, line by line:

* ``tome/patch/timm.py``: ``ToMeBlock.forward`` (lines 34-56: attention with the token sizes,
  residual, ``bipartite_soft_matching`` on the returned metric with ``r`` popped from the
  schedule, ``merge_wavg``, then the MLP), ``ToMeAttention.forward`` (lines 66-96: logits
  ``q k^T * scale``, plus ``size.log()`` per key when sizes are tracked, softmax; returns the
  keys averaged over heads, ``k.mean(1)``), ``apply_patch`` (lines 116-150: ``prop_attn=True``,
  ``class_token`` when the model has one);
* ``tome/merge.py``: ``bipartite_soft_matching`` (lines 18-97) and ``merge_wavg`` (210-224);
* ``tome/utils.py``: ``parse_r`` (lines 80-105).

LLaVA then takes ``hidden_states[vision_feature_layer]``, drops [CLS] (strategy ``default``) and
projects (transformers' ``LlavaModel.get_image_features``).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import vtc
from vtc.errors import BudgetError, MethodNotApplicableError
from vtc.methods.tome import ToMe, budget_schedule, official_schedule, remaining
from vtc.plan import ModelInfo
from vtc.testing import tiny_inputs, tiny_llava, tiny_model

from .conftest import BACKENDS
from .test_equivalence import prefill_logits, traced

torch.set_num_threads(1)


# -- the reference, from the official code -------------------------------------------------
def official_parse_r(num_layers: int, r) -> list[int]:
    """tome/utils.py, ``parse_r``, lines 80-105."""
    inflect = 0
    if isinstance(r, list):
        return list(r) + [0] * (num_layers - len(r))
    if isinstance(r, tuple):
        r, inflect = r
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1)
    return [int(min_val + step * i) for i in range(num_layers)]


def official_matching(metric: torch.Tensor, r: int, class_token: bool):
    """tome/merge.py, ``bipartite_soft_matching``, lines 18-97 (merge only; no distill token)."""
    protected = 1 if class_token else 0
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)  # line 44
    if r <= 0:
        return lambda x, mode="mean": x
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)  # line 50
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf  # line 55
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]  # line 60
        unm_idx = edge_idx[..., r:, :]
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]  # line 68: the class token stays first

    def merge(x: torch.Tensor, mode="mean") -> torch.Tensor:  # lines 70-80
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    return merge


def official_merge_wavg(merge, x: torch.Tensor, size: torch.Tensor | None):
    """tome/merge.py, ``merge_wavg``, lines 210-224."""
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


@torch.no_grad()
def official_llava_features(model, pixel_values: torch.Tensor, r, prop_attn: bool = True) -> torch.Tensor:
    """The projected features LLaVA hands to its LLM with the official ToMe patch on its CLIP tower
    (``[images, tokens, D]``), computed from the tower's weights without its forward."""
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    schedule = official_parse_r(len(layers), r)  # ToMeVisionTransformer.forward, timm.py line 107
    x = tower.pre_layrnorm(tower.embeddings(pixel_values))
    hidden, size = [x], None  # timm.py line 108: sizes start unset
    for layer in layers:
        # ToMeAttention.forward, timm.py lines 66-96, on CLIP's separate q/k/v projections.
        attn = layer.self_attn
        h = layer.layer_norm1(x)
        bsz, n, c = h.shape
        q, k, v = (p(h).reshape(bsz, n, attn.num_heads, -1).transpose(1, 2)
                   for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        logits = (q @ k.transpose(-2, -1)) * attn.scale
        if prop_attn and size is not None:
            logits = logits + size.log()[:, None, None, :, 0]  # line 86
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(bsz, n, c)
        x = x + attn.out_proj(out)  # ToMeBlock.forward, line 38
        r_i = schedule.pop(0)  # line 40
        if r_i > 0:
            merge = official_matching(k.mean(1), r_i, class_token=True)  # lines 43-48
            x, size = official_merge_wavg(merge, x, size)  # line 53
        x = x + layer.mlp(layer.layer_norm2(x))  # line 55
        hidden.append(x)
    feats = hidden[model.config.vision_feature_layer][:, 1:]  # strategy "default": [CLS] dropped
    return model.model.multi_modal_projector(feats)


# -- vtc against the reference ---------------------------------------------------------------
@functools.cache
def _model(attn: str, text_model: str = "llama", deep: bool = False):
    if deep:  # 8x8 patches, 6 vision layers (5 reach the features): more merging, more rounds
        return tiny_llava(attn=attn, text_model=text_model, image_size=112, vision_layers=6, layers=2)
    return tiny_model("llava", attn=attn, text_model=text_model)


def vtc_llm_features(model, inputs: dict, **params) -> tuple[torch.Tensor, vtc.Stats]:
    """The image rows of the embeddings vtc hands to the LLM, per image ``[images, tokens, D]``."""
    _, stages, embeds, stats = traced(model, inputs, lambda: prefill_logits(model, inputs), "tome", **params)
    ids = inputs["input_ids"]
    (_, rows, _), = stages  # each sample's rows of the reduced prompt
    feats = [embeds[b, embeds.shape[1] - r.numel():][ids[b, r] == model.config.image_token_id]
             for b, r in enumerate(rows)]
    return torch.cat(feats).view(-1, stats.tokens_entering_llm, feats[0].shape[-1]), stats


BUDGETS = [{"budget": 6}, {"budget": 2}, {"budget": 13}, {"r": [3, 2, 4, 1]}, {"r": 3, "inflect": -1.0},
           {"budget": 6, "prop_attn": False}]


@pytest.mark.parametrize("backend", BACKENDS, ids=["-".join(b) for b in BACKENDS])
@pytest.mark.parametrize("params", BUDGETS, ids=[",".join(f"{k}={v}" for k, v in p.items()) for p in BUDGETS])
def test_llm_receives_the_official_tome_features(backend, params):
    model = _model(*backend)
    inputs = tiny_inputs(model, batch=2, images=2, pad=[0, 3], seed=1)
    got, stats = vtc_llm_features(model, inputs, **params)
    if "budget" in params:
        r = budget_schedule(16, params["budget"], 3) + [0]
    else:
        r = params["r"] if "inflect" not in params else (params["r"], params["inflect"])
    ref = official_llava_features(model, inputs["pixel_values"], r, prop_attn=params.get("prop_attn", True))
    assert got.shape == ref.shape and stats.tokens_entering_llm == ref.shape[1]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("budget", [3, 9, 40])
def test_a_deeper_tower_matches_too(attn, budget):
    model = _model(attn, deep=True)
    inputs = tiny_inputs(model, batch=2, seed=3)
    got, _ = vtc_llm_features(model, inputs, budget=budget)
    ref = official_llava_features(model, inputs["pixel_values"], budget_schedule(64, budget, 5) + [0])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_proportional_attention_changes_the_features():
    model = _model("sdpa")
    inputs = tiny_inputs(model, seed=2)
    with_sizes, _ = vtc_llm_features(model, inputs, budget=4)
    without, _ = vtc_llm_features(model, inputs, budget=4, prop_attn=False)
    assert not torch.allclose(with_sizes, without, atol=1e-4)


# -- schedules --------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [0, 1, 8, 16, (8, -1.0), (8, 0.5), (16, 1.0), [4, 2]])
def test_official_schedule_is_parse_r(r):
    ours = official_schedule(r[0], 24, r[1]) if isinstance(r, tuple) else official_schedule(r, 24)
    assert ours == official_parse_r(24, r)


@pytest.mark.parametrize(("tokens", "blocks"), [(576, 23), (16, 3), (64, 5), (100, 2)])
def test_budget_schedule_reaches_every_feasible_budget(tokens, blocks):
    least = math.ceil(tokens / 2 ** blocks)
    for keep in range(least, tokens + 1):
        schedule = budget_schedule(tokens, keep, blocks)
        assert remaining(tokens, schedule) == keep
        # The constant schedule (the extra tokens to the earliest blocks) whenever no block would
        # have to merge more than half its tokens.
        even = [(tokens - keep) // blocks + (i < (tokens - keep) % blocks) for i in range(blocks)]
        left = [tokens - sum(even[:i]) for i in range(blocks)]
        if all(r <= n // 2 for r, n in zip(even, left)):
            assert schedule == even
    with pytest.raises(BudgetError, match=f"between {least} and {tokens}"):
        budget_schedule(tokens, least - 1, blocks)


def test_llava_15_default_schedules():
    info = ModelInfo("llava", 576, 32, 24, 22, True)
    plan = ToMe().compile(info, 64)
    r = dict(plan.stages[0].options)["r"]
    assert len(r) == 24 and r[-1] == 0 and sum(r) == 512 and set(r[:23]) == {22, 23}
    assert plan.tokens_entering_llm == 64
    # The official constant r=16 on all 24 blocks: 23 of them reach layer -2's features.
    assert ToMe(r=16).compile(info).tokens_entering_llm == 576 - 23 * 16


def test_r_and_a_budget_together_are_refused():
    with pytest.raises(BudgetError, match="either r"):
        vtc.plan(_model("sdpa"), "tome", budget=6, r=2)


# -- where ToMe does not apply ---------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava_next", "internvl"])
def test_tiled_families_refuse_tome_and_name_merge(family):
    model = tiny_model(family, layers=1, vision_layers=2)
    with pytest.raises(MethodNotApplicableError, match="inside the vision tower.*use merge"):
        vtc.apply(model, "tome", budget=0.5)
    assert not vtc.is_applied(model)
    vtc.plan(model, "merge", budget=0.5)  # the alternative runs there


def test_features_of_several_layers_are_refused():
    model = tiny_llava(layers=1, vision_layers=3)
    model.config.vision_feature_layer = [-3, -2]
    with pytest.raises(MethodNotApplicableError, match="one layer's patch tokens.*use merge"):
        vtc.apply(model, "tome", budget=8)
    assert not vtc.is_applied(model)


def test_composes_with_an_in_llm_method():
    model = _model("sdpa")
    inputs = tiny_inputs(model, batch=2, pad=[0, 2], seed=5)
    with vtc.compressed(model, "tome+fastv", budget=5, layer=2):
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
        stats = vtc.stats(model)
    assert stats.tokens_entering_llm == 10 and stats.equivalent_tokens <= 5
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)


def test_beam_search_and_several_returns():
    # generate splits the encoder output among samples by counting placeholders: the merged
    # features travel padded to the placeholder count.
    model = _model("sdpa")
    inputs = tiny_inputs(model, batch=2, pad=[0, 2], seed=5)
    with vtc.compressed(model, "tome", budget=5):
        out = model.generate(**inputs, max_new_tokens=3, num_beams=3, num_return_sequences=2, do_sample=False,
                             pad_token_id=0)
        assert vtc.stats(model).tokens_entering_llm == 5
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    assert out.shape == (4, inputs["input_ids"].shape[1] + 3)
    assert [f.shape[0] for f in features] == [16, 16] and all(bool((f[5:] == 0).all()) for f in features)
