"""SparseVLM against a reference of its official rule, on tiny LLaVA-1.5-shaped models (576 tokens per image).

The reference is written from Gumpest/SparseVLMs @26a5f48 (main: v1.5, the default mode;
``USE_VERSION=2_0`` switches to SparseVLM+), ``llava/model/language_model/modelling_sparse_llama.py``
and ``score.py``, lines cited below. It runs the *unpatched* model's own layers one by one and shares
nothing with vtc but the model.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import vtc
from vtc.testing import tiny_inputs, tiny_llava

torch.set_num_threads(1)
ATTN = ["eager", "sdpa"]


@functools.cache
def _model(attn: str, kv_heads: int = 2, layers: int = 5):
    return tiny_llava(image_size=336, vision_layers=2, layers=layers, kv_heads=kv_heads, attn=attn)


def _rotate(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _attention(layer, h, cos_sin):
    """Layer ``layer``'s attention probabilities ``[1, H, T, T]`` as the official sdpa attention returns
    them (``utils.py`` ``scaled_dot_product_attention`` L95-116: softmax of ``q k^T / sqrt(hd)`` with the
    causal mask, after RoPE and ``repeat_kv``, modelling_sparse_llama.py L643-677)."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    t, hd = x.shape[1], attn.head_dim
    q = attn.q_proj(x).view(1, t, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(1, t, -1, hd).transpose(1, 2)
    cos, sin = cos_sin
    q = q * cos[:, None] + _rotate(q) * sin[:, None]
    k = k * cos[:, None] + _rotate(k) * sin[:, None]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(hd)
    logits = logits + torch.full((t, t), float("-inf")).triu(1)
    return logits.softmax(dim=-1)


def cluster_and_merge(x, cluster_num, noise=False):
    """``utils.py`` ``cluster_and_merge`` (L179-239), DPC-kNN. The official code adds ``1e-6 * rand`` to
    the densities (L191-192) to break ties at random; vtc breaks them deterministically, so the
    reference leaves the noise out unless ``noise`` (the tiny model's images repeat patches: tied
    tokens are common here, and merged tokens may differ with it)."""
    b, n, c = x.shape
    dist_matrix = (x[:, :, None] - x[:, None]).norm(dim=-1, p=2) / (c**0.5)
    dist_nearest, _ = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest**2).mean(dim=-1)).exp()
    if noise:
        density = density + torch.rand(density.shape, generator=torch.Generator().manual_seed(0)) * 1e-6
    mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    _, index_down = torch.topk(dist * density, k=cluster_num, dim=-1)
    idx_cluster = dist_matrix[torch.arange(b)[:, None], index_down].argmin(dim=1)
    idx_cluster[0, index_down[0]] = torch.arange(cluster_num)
    all_weight = x.new_zeros(b * cluster_num, 1).index_add_(0, idx_cluster.reshape(-1), x.new_ones(b * n, 1)) + 1e-6
    source = (x / all_weight[idx_cluster]).reshape(b * n, c)
    return x.new_zeros(b * cluster_num, c).index_add_(0, idx_cluster.reshape(-1), source).reshape(b, cluster_num, c)


def official_sparsevlm(model, inputs, pruning_loc, counts, recycle=False, prompt=None):
    """``LlamaDynamicvitModel.forward``: raters from the LLM's input embeddings, the image against the
    text after it (L198-204: ``softmax(v t^T)`` over the text, mean over the image, above the mean);
    at each layer of ``pruning_loc`` the layer runs and returns its attention (L229-239), rated by the
    raters (``score.py`` ``attn_postprocess_topk`` L23-45: mean over heads, rater rows, image columns,
    mean over raters, ``topk(min(count, v - 1))``) keeps image tokens of the layer's *output* in order,
    re-indexed ``position_ids[:, :len]`` (L308-320, the branch without merging). ``recycle``: the
    default branch (L275-307): the pruned image tokens' top ``int(0.3 d) + 1`` by relevance clustered
    into ``int(m / 10) + 1`` merged tokens placed after the kept ones, which count as image tokens from
    then on. ``prompt``: the rows before it are the prompt (raters are chosen from it); the rows after
    it, generated tokens, are kept (what a cached decode step sees). Returns each stage's kept grid
    indices (merged tokens left out) and the last row's logits."""
    lm = model.model.language_model
    ids = inputs["input_ids"]
    prompt = ids.shape[1] if prompt is None else prompt
    image = ids[0] == model.config.image_token_id
    image[prompt:] = False
    with torch.no_grad():
        h = lm.embed_tokens(ids)
        h[0, image] = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    start, n = int(image.nonzero()[0, 0]), int(image.sum())
    kept, grid = [], torch.arange(n)
    with torch.no_grad():
        v_t, t_t = h[:, start:start + n], h[:, start + n:prompt]
        m_v_t = (v_t @ t_t.transpose(1, 2)).softmax(2).mean(1)
        raters = torch.where(m_v_t > m_v_t.mean())[1]
        for idx, layer in enumerate(lm.layers):
            t = h.shape[1]
            pos = torch.arange(t)[None]
            cos_sin = lm.rotary_emb(h, pos)
            mask = torch.full((t, t), torch.finfo(h.dtype).min).triu(1)[None, None]
            out = layer(h, attention_mask=mask, position_embeddings=cos_sin, position_ids=pos)
            if idx in pruning_loc:
                count = counts[pruning_loc.index(idx)]
                probs = _attention(layer, h, cos_sin).mean(1)
                relation = probs[:, raters + start + n, start:start + n].mean(1)[0]
                top = relation.topk(min(count, n - 1)).indices.sort().values
                merged = out[:, :0]
                if recycle:
                    pruned = torch.ones(n, dtype=torch.bool)
                    pruned[top] = False
                    pruned = pruned.nonzero()[:, 0]
                    m = int(pruned.numel() * 0.3) + 1
                    best = relation[pruned].topk(m).indices
                    merged = cluster_and_merge(out[:, start + pruned[best]], int(m / 10) + 1)
                rows = torch.cat([torch.arange(start), start + top])
                out = torch.cat([out[:, rows], merged, out[:, start + n:]], dim=1)
                grid = torch.cat([grid[top], torch.full((merged.shape[1],), -1)])
                n = grid.numel()
                kept.append(grid[grid >= 0])
            h = out
        logits = model.lm_head(lm.norm(h))[0, -1]
    return kept, logits


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_sparsevlm_prunes_the_official_tokens(attn, kv_heads):
    model = _model(attn, kv_heads)
    inputs = tiny_inputs(model, seed=9)
    for layers, counts in [((0, 1, 2), (300, 200, 110)), ((0, 1, 2), (303, 110, 36)), ((1, 3), (238, 48))]:
        ref, ref_logits = official_sparsevlm(model, inputs, list(layers), list(counts))
        with vtc.compressed(model, "sparsevlm", layers=layers, counts=counts, recycle=False), torch.no_grad():
            logits = model(**inputs).logits
            stats = vtc.stats(model)
        for layer, want in zip(layers, ref):
            assert torch.equal(stats.kept[f"layer:{layer + 1}"][0], want), (layers, counts, layer)
        torch.testing.assert_close(logits[0, -1], ref_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_sparsevlm_recycles_as_the_official_code(attn, kv_heads):
    model = _model(attn, kv_heads)
    inputs = tiny_inputs(model, seed=9)
    for layers, counts in [((0, 1, 2), (300, 200, 110)), ((0, 1, 2), (303, 110, 36)), ((1, 3), (66, 30))]:
        ref, ref_logits = official_sparsevlm(model, inputs, list(layers), list(counts), recycle=True)
        plan = vtc.plan(model, "sparsevlm", layers=layers, counts=counts)
        with vtc.compressed(model, "sparsevlm", layers=layers, counts=counts), torch.no_grad():
            logits = model(**inputs).logits
            stats = vtc.stats(model)
        for layer, want, stage in zip(layers, ref, plan.stages):
            assert torch.equal(stats.kept[f"layer:{layer + 1}"][0], want), (layers, counts, layer)
            assert stage.keep > want.numel()  # the merged tokens count
        torch.testing.assert_close(logits[0, -1], ref_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attn", ATTN)
def test_sparsevlm_recycled_decode_steps_equal_recomputation(attn):
    """Decode steps over the cache (merged rows in it, per-layer lengths) equal a recomputation of the
    prompt and the generated tokens with the prompt's choices (causal attention: later tokens change
    neither the prompt rows nor the raters' attention)."""
    model = _model(attn)
    inputs = tiny_inputs(model, seed=3)
    layers, counts = (0, 1, 2), (300, 200, 110)
    with vtc.compressed(model, "sparsevlm", layers=layers, counts=counts):
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    prompt = inputs["input_ids"].shape[1]
    for t in range(3):
        ids = out.sequences[:, : prompt + t + 1]
        grown = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
        _, ref = official_sparsevlm(model, grown, list(layers), list(counts), recycle=True, prompt=prompt)
        if t + 1 < 3:
            torch.testing.assert_close(out.logits[t + 1][0], ref, atol=1e-4, rtol=1e-4)


def test_sparsevlm_defaults_are_the_official_rows():
    model = _model("sdpa", layers=32)
    for retain, counts in [(None, [300, 200, 110]), (128, [303, 110, 36]), (96, [238, 48, 26]), (64, [66, 30, 17])]:
        plan = vtc.plan(model, "sparsevlm", retain=retain, recycle=False)
        assert [s.where for s in plan.stages] == ["layer:3", "layer:7", "layer:16"]
        assert [s.keep for s in plan.stages] == counts
        assert all(s.positions == "compact" and s.scorer.kind == "rater_attention" for s in plan.stages)
    # With the merged tokens (the official default): 192's 300 + 9, 200 + 4, 110 + 3.
    plan = vtc.plan(model, "sparsevlm")
    assert [s.keep for s in plan.stages] == [309, 204, 113] and plan.stages[0].reducer == "recycle"


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_sparsevlm_budget_is_met(budget):
    model = _model("sdpa", layers=32)
    assert abs(vtc.plan(model, "sparsevlm", budget=budget).equivalent_tokens - budget) < 0.5


def test_sparsevlm_refuses_what_it_cannot_do():
    model = _model("sdpa")
    with pytest.raises(vtc.BudgetError, match="lowest feasible budget"):
        vtc.plan(model, "sparsevlm", budget=100)
    with pytest.raises(vtc.VtcError, match="the official rows are"):
        vtc.plan(model, "sparsevlm", retain=100)
    with pytest.raises(vtc.VtcError, match="one positive count per layer"):
        vtc.plan(model, "sparsevlm", counts=(10,))
