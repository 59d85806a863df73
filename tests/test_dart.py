"""DART against a reference of its official rule, on tiny LLaVA-1.5-shaped models (576 tokens per image).

The reference is written from ZichenWen1/DART as of its last upstream commit in the fork
xqy1111111/DART (5a19452, 2025-08-31, the authors' own history; the official repository itself
cannot be fetched here): ``llava/model/language_model/modeling_llama_self.py``, lines cited below.
It runs the *unpatched* model's own layers one by one and shares nothing with vtc but the model.
"""

from __future__ import annotations

import functools

import pytest
import torch

import vtc
from vtc.testing import tiny_inputs, tiny_llava

torch.set_num_threads(1)
ATTN = ["eager", "sdpa"]


@functools.cache
def _model(attn: str, kv_heads: int):
    return tiny_llava(image_size=336, vision_layers=2, layers=4, kv_heads=kv_heads, attn=attn)


def _rotate(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def official_retained(last_layer_state, any_states, start, length, truncation, pivot_image, pivot_text):
    """``DART.get_retained_image_token`` (L397-450): ``TOKEN_TOPK = ceil(MAX_NUM_TRUNCTION // (pivots))``
    (L409); keys ``[B, heads, N, hd]`` flattened per token (L419); the image and the tokens after it
    ranked by the keys' L1 norm (L421-428); pivots walked in the order of ``list(set(...))`` (L429,
    L434), each adding the ``TOKEN_TOPK`` remaining image tokens of lowest cosine similarity on the
    normed hidden states (L435-443); the text pivots removed (L445)."""
    token_topk = truncation // (pivot_image + pivot_text)
    keys = any_states.permute(0, 2, 1, 3).reshape(any_states.shape[0], any_states.shape[2], -1)
    image_norm = torch.norm(keys[0][start:start + length], p=1, dim=-1)
    query_norm = torch.norm(keys[0][start + length:], p=1, dim=-1)
    image_indices = (image_norm.topk(pivot_image).indices + start).tolist()
    query_indices = (query_norm.topk(pivot_text).indices + start + length).tolist()
    indices_set = set(image_indices + query_indices)
    valid = set(range(start, start + length)) - set(image_indices)
    valid_list = list(valid)
    for item in list(indices_set):
        cos = -torch.nn.functional.cosine_similarity(last_layer_state[0][item, :], last_layer_state[0][valid_list, :],
                                                     dim=-1)
        top = [valid_list[i] for i in cos.topk(token_topk).indices]
        indices_set.update(top)
        valid.difference_update(top)
        valid_list = list(valid)
    indices_set.difference_update(query_indices)
    return torch.tensor(list(indices_set))


def official_dart(model, inputs, k_layer, truncation, pivot_image=4, pivot_text=4):
    """``DART.forward`` (L331-369): layers run unchanged up to K; at ``layer_idx == K`` the previous
    layer's output through the final norm (L340-341) and its post-RoPE keys (``layer_outputs[-2]``,
    L342: ``LlamaDecoderLayer`` returns ``key_states`` L993, after ``apply_rotary_pos_emb`` L875) choose
    the image tokens; all other tokens are kept, sorted (L350-352), with their original positions
    (``position_ids = keep_indexs``, L358) under a causal mask cut to the new length (L356-357).
    Returns the kept grid indices and the last row's logits."""
    lm = model.model.language_model
    ids = inputs["input_ids"]
    image = ids[0] == model.config.image_token_id
    with torch.no_grad():
        h = lm.embed_tokens(ids)
        h[0, image] = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    start, n = int(image.nonzero()[0, 0]), int(image.sum())
    with torch.no_grad():
        t = h.shape[1]
        pos = torch.arange(t)[None]
        causal = torch.full((t, t), torch.finfo(h.dtype).min).triu(1)[None, None]
        mask, kept, keys = causal, None, None
        for idx, layer in enumerate(lm.layers):
            if idx == k_layer:
                retained = official_retained(lm.norm(h), keys, start, n, truncation, pivot_image, pivot_text)
                keep = torch.cat([torch.arange(start), retained, torch.arange(start + n, t)]).sort().values
                h, pos = h[:, keep], keep[None]
                mask = causal[..., : keep.numel(), : keep.numel()]
                kept = retained.sort().values - start
            if idx == k_layer - 1:
                attn = layer.self_attn
                x = layer.input_layernorm(h)
                k = attn.k_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
                cos, sin = lm.rotary_emb(h, pos)
                keys = k * cos[:, None] + _rotate(k) * sin[:, None]
            h = layer(h, attention_mask=mask, position_embeddings=lm.rotary_emb(h, pos), position_ids=pos)
        logits = model.lm_head(lm.norm(h))[0, -1]
    return kept, logits


def run(model, inputs, **params):
    with vtc.compressed(model, "dart", **params), torch.no_grad():
        logits = model(**inputs).logits
        return vtc.stats(model).kept, logits


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_dart_keeps_the_official_tokens(attn, kv_heads):
    model = _model(attn, kv_heads)
    inputs = tiny_inputs(model, seed=11)
    for k_layer, truncation in [(2, 192), (2, 128), (2, 64), (1, 128), (3, 100)]:
        ref, ref_logits = official_dart(model, inputs, k_layer, truncation)
        assert ref.numel() == 4 + 8 * (truncation // 8)
        kept, logits = run(model, inputs, layer=k_layer, truncation=truncation)
        assert torch.equal(kept[f"layer:{k_layer}"][0], ref), (k_layer, truncation)
        torch.testing.assert_close(logits[0, -1], ref_logits, atol=1e-4, rtol=1e-4)
    ref, _ = official_dart(model, inputs, 2, 96, pivot_image=2, pivot_text=6)
    kept, _ = run(model, inputs, truncation=96, pivot_image=2, pivot_text=6)
    assert torch.equal(kept["layer:2"][0], ref)


def test_dart_defaults_are_the_official_scripts():
    model = _model("sdpa", 2)
    stage = vtc.plan(model, "dart").stages[0]
    assert (stage.where, stage.scorer.kind, stage.scorer.layers, stage.keep, stage.positions) == (
        "layer:2", "dart", (1,), 132, "keep")
    assert dict(stage.scorer.options) == {"pivot_image": 4, "pivot_text": 4}


@pytest.mark.parametrize(("budget", "keep"), [(400, 224), (350, 124), (300, 24)])
def test_dart_budget_keeps_the_solved_count(budget, keep):
    # 4 layers, K = 2: keep = (budget * 4 - 2 * 576) / 2; 224 - 4 pivots is not a multiple of 8.
    model = _model("sdpa", 2)
    inputs = tiny_inputs(model, seed=2)
    assert vtc.plan(model, "dart", budget=budget).stages[0].keep == keep
    kept, _ = run(model, inputs, budget=budget)
    assert kept["layer:2"][0].numel() == keep


def test_dart_refuses_what_it_cannot_do():
    model = _model("sdpa", 2)
    with pytest.raises(vtc.BudgetError, match="lowest feasible budget"):
        vtc.plan(model, "dart", budget=100)
    with pytest.raises(vtc.BudgetError, match="give one of budget, keep and truncation"):
        vtc.plan(model, "dart", budget=400, truncation=128)
    with pytest.raises(vtc.VtcError, match="use a layer in"):
        vtc.plan(model, "dart", layer=4)


def test_dart_walks_the_pivots_in_the_official_set_order():
    """On random keys and states at many image offsets, the op keeps what the official code keeps; walking
    the pivots in another order (the set of other indices) differs in some of these cases: the order matters."""
    from vtc.ops import dart_select

    torch.manual_seed(0)
    differs = 0
    for trial in range(40):
        start, length, text = 3 + 7 * trial, 48, 10
        n = start + length + text
        keys, states = torch.randn(n, 16), torch.randn(n, 8)
        want = official_retained(states[None], keys.view(1, n, 2, 8).transpose(1, 2), start, length, 24, 4, 4)
        image, after = torch.arange(start, start + length), torch.arange(start + length, n)
        got = dart_select(keys, states, image, after, 4 + 8 * 3)
        assert torch.equal(got, want.sort().values), trial
        # The same rule with the pivots walked in another order (a set of negated indices).
        shuffled = dart_select(keys, states, image, after, 4 + 8 * 3, positions=-torch.arange(n))
        differs += not torch.equal(shuffled, got)
    assert differs > 0
