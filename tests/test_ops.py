"""The pure operators, checked against what the models compute themselves."""

from __future__ import annotations

import pytest
import torch

from vtc import ops


def test_topk_keep_returns_sorted_best_with_valid_mask():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.9, 0.8, 0.1, 0.2]])
    assert ops.topk_keep(scores, 2).tolist() == [[1, 3], [0, 1]]
    valid = torch.tensor([[True, False, True, True], [False, False, True, True]])
    assert ops.topk_keep(scores, 2, valid).tolist() == [[2, 3], [2, 3]]
    with pytest.raises(ValueError):
        ops.topk_keep(scores, 5)


def test_gather_tokens_per_sample_and_broadcast():
    x = torch.arange(24.0).view(2, 4, 3)
    idx = torch.tensor([[3, 0], [1, 2]])
    out = ops.gather_tokens(x, idx)
    assert torch.equal(out[0], x[0, [3, 0]]) and torch.equal(out[1], x[1, [1, 2]])
    shared = ops.gather_tokens(x[:1], idx)  # batch of one broadcast to the indices' batch
    assert torch.equal(shared[1], x[0, [1, 2]])
    mask = torch.arange(2 * 1 * 4 * 4).view(2, 1, 4, 4)
    assert torch.equal(ops.gather_tokens(mask, idx, dim=3)[1, 0, :, 0], mask[1, 0, :, 1])


@pytest.mark.parametrize("text_model", ["llama", "qwen2"])
def test_query_attention_matches_eager_attention_weights(text_model):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import AutoModel

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(text_model, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=8, num_key_value_heads=2, vocab_size=50)
    cfg._attn_implementation = "eager"
    lm = AutoModel.from_config(cfg).eval()
    ids = torch.randint(0, 50, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    captured = {}
    layer = lm.layers[1]
    layer.register_forward_pre_hook(lambda m, a, k: captured.update(h=a[0] if a else k["hidden_states"],
                                                                    pe=k["position_embeddings"]), with_kwargs=True)
    with torch.no_grad():
        out = lm(input_ids=ids, attention_mask=mask, position_ids=pos, output_attentions=True)
        expected = out.attentions[1][:, :, -1].mean(dim=1)  # last query row, mean over heads
        got = ops.query_attention(layer, captured["h"], captured["pe"], key_mask=mask.bool())
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert torch.all(got[1, :3] == 0)


def test_query_attention_at_an_inner_query_is_causal():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64)
    h = torch.randn(1, 7, 32)
    pe = LlamaRotaryEmbedding(cfg)(h, torch.arange(7)[None])
    att = ops.query_attention(LlamaDecoderLayer(cfg, 0), h, pe, query_index=3)
    assert torch.all(att[0, 4:] == 0) and torch.allclose(att.sum(), torch.tensor(1.0))


def test_cls_attention_matches_clip_eager_weights():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=28, patch_size=7)
    cfg._attn_implementation = "eager"
    tower = CLIPVisionModel(cfg).eval()
    captured = {}
    attn = tower.encoder.layers[1].self_attn
    attn.register_forward_pre_hook(lambda m, a, k: captured.update(h=k["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        out = tower(pixel_values=torch.randn(3, 3, 28, 28), output_attentions=True)
        expected = out.attentions[1][:, :, 0].mean(dim=1)
        got = ops.cls_attention(attn, captured["h"])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_bipartite_soft_matching_merges_most_similar_pairs():
    # Tokens 0/1 are near-duplicates, 2/3 orthogonal to them and to each other.
    x = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 0.01, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    merge, unmerge = ops.bipartite_soft_matching(x, r=1)
    merged = merge(x)
    assert merged.shape == (1, 3, 3)
    torch.testing.assert_close(merged[0, 0], (x[0, 0] + x[0, 1]) / 2)  # 0 merged into 1, in original order
    torch.testing.assert_close(merged[0, 1:], x[0, 2:])
    back = unmerge(merged)
    assert back.shape == x.shape and torch.equal(back[0, 0], back[0, 1])


def test_merge_weighted_counts_original_tokens():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4)
    merge, _ = ops.bipartite_soft_matching(x, r=3)
    merged, size = ops.merge_weighted(merge, x)
    assert merged.shape == (2, 5, 4) and torch.equal(size.sum(dim=1).squeeze(-1), torch.tensor([8.0, 8.0]))
    # The size-weighted mean preserves the total mass of the sequence.
    torch.testing.assert_close((merged * size).sum(dim=1), x.sum(dim=1))


def test_attention_pagerank_matches_dense_pagerank_over_eager_weights():
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=50)
    cfg._attn_implementation = "eager"
    lm = LlamaModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 13))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :4] = 0
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    captured = {}
    lm.layers[1].register_forward_pre_hook(
        lambda m, a, k: captured.update(h=a[0] if a else k["hidden_states"], pe=k["position_embeddings"]),
        with_kwargs=True)
    with torch.no_grad():
        weights = lm(input_ids=ids, attention_mask=mask, position_ids=pos, output_attentions=True).attentions[1]
        weights = weights * mask[:, None, :, None]  # padded queries hold no mass
        s = torch.full(weights.shape[:2] + (13,), 1 / 13)
        for _ in range(4):
            s = torch.einsum("bhi,bhij->bhj", s, weights)
        expected = s.pow(2).mean(dim=1).sqrt()
        for chunk in (1, 5, 13, 64):  # blocks from one row to the whole matrix
            got = ops.attention_pagerank(lm.layers[1], captured["h"], captured["pe"], key_mask=mask.bool(), iters=4,
                                         temperature=1.0, chunk=chunk)
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)
        # The layer's own q/k projections, captured as its attention computes them, give the same.
        layer = lm.layers[1]
        h = layer.input_layernorm(captured["h"])
        projections = (layer.self_attn.q_proj(h), layer.self_attn.k_proj(h))
        got = ops.attention_pagerank(layer, captured["h"], captured["pe"], key_mask=mask.bool(), iters=4,
                                     temperature=1.0, projections=projections)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(
            ops.query_attention(layer, captured["h"], captured["pe"], key_mask=mask.bool(), projections=projections),
            ops.query_attention(layer, captured["h"], captured["pe"], key_mask=mask.bool()), atol=1e-7, rtol=1e-5)


def test_grid_fit_is_pools_rule_on_a_square_and_keeps_a_rectangles_shape():
    from vtc.ops.grid import grid_fit
    from vtc.ops.reduce import grid_shape

    for k in range(1, 577):  # LLaVA's rule wherever its grid fits in the 24x24 grid
        if grid_shape(k)[1] <= 24:
            assert grid_fit(24, 24, k) == grid_shape(k)
    for h, w in [(4, 6), (6, 4), (2, 16), (12, 30), (32, 20)]:
        assert grid_fit(h, w, h * w) == (h, w)
        for k in range(1, h * w + 1):
            r, c = grid_fit(h, w, k)
            assert 1 <= r <= h and 1 <= c <= w and r * c <= k
            if r > 1 and c > 1:  # as elongated as the grid along its long side, at most twice as much
                long, short = (c / r, w / h) if w >= h else (r / c, h / w)
                assert short <= long <= 2 * short
