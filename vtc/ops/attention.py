"""Attention scores computed from a module's own projections, one query row at a time.

These never build the ``N x N`` attention matrix and never need the model to return
attention weights, so they work under sdpa, flash attention and eager alike, and with
quantized projections (bitsandbytes): they call the modules, they do not read weights.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dimension, as rotary embeddings need.

    Example:
        >>> rotate_half(torch.tensor([1., 2., 3., 4.]))
        tensor([-3., -4.,  1.,  2.])
    """
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary embeddings to ``x`` ``[B, heads, N, d]`` with ``cos``/``sin`` ``[B, N, d]``.

    Example:
        >>> x = torch.ones(1, 1, 2, 4)
        >>> apply_rope(x, torch.ones(1, 2, 4), torch.zeros(1, 2, 4)).shape
        torch.Size([1, 1, 2, 4])
    """
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def _mean_head_softmax(logits: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, heads, N]`` logits -> softmax over keys (masked), mean over heads -> ``[B, N]``."""
    logits = logits.float()
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, :].bool(), float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)


def _rows(x: torch.Tensor, rows: slice | torch.Tensor) -> torch.Tensor:
    """``x[:, rows]`` for a slice, or each sample's own rows for an index tensor ``[B, r]``."""
    if isinstance(rows, slice):
        return x[:, rows]
    index = rows.reshape(*rows.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.expand(rows.shape[0], *x.shape[1:]).gather(1, index)


def _rotated_qk(layer: nn.Module, hidden_states: torch.Tensor, position_embeddings,
                rows: slice | torch.Tensor, projections: tuple[torch.Tensor, torch.Tensor] | None = None):
    """A decoder layer's queries (of ``rows``) and keys (of all tokens) as its attention sees
    them: after ``input_layernorm``, the projections, optional q/k norms and RoPE.
    ``projections``: the layer's own ``q_proj`` and ``k_proj`` outputs for all tokens, when its
    attention already computed them (then only the norms and RoPE are applied here).
    Shapes ``[B, heads, r, d]`` and ``[B, kv_heads, N, d]``."""
    attn = layer.self_attn
    bsz, n, _ = hidden_states.shape
    hd = attn.head_dim
    if projections is None:
        h = layer.input_layernorm(hidden_states)
        q, k = attn.q_proj(_rows(h, rows)), attn.k_proj(h)
    else:
        q, k = _rows(projections[0], rows), projections[1]
    q = q.reshape(bsz, q.shape[1], -1, hd).transpose(1, 2)
    k = k.reshape(bsz, n, -1, hd).transpose(1, 2)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = (t.expand(bsz, -1, -1) for t in position_embeddings)
    return apply_rope(q, _rows(cos, rows), _rows(sin, rows)), apply_rope(k, cos, sin)


def _grouped_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Unscaled ``q k^T`` of queries ``[B, heads, r, d]`` and keys ``[B, kv_heads, N, d]``: ``[B, heads, r, N]``.
    Grouped-query attention without repeating the keys: the query heads are grouped per kv head."""
    bsz, heads, r, hd = q.shape
    kv_heads, n = k.shape[1], k.shape[2]
    logits = torch.matmul(q.reshape(bsz, kv_heads, heads // kv_heads * r, hd), k.transpose(-1, -2))
    return logits.view(bsz, heads, r, n)


def _causal_mean_softmax(logits: torch.Tensor, rows: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, heads, r, N]`` logits of the query ``rows`` ``[B, r]`` -> softmax (in float) over the keys
    allowed by causality and ``key_mask``, mean over heads -> ``[B, r, N]``."""
    allowed = torch.arange(logits.shape[-1], device=rows.device)[None, None] <= rows[:, :, None]  # [B, r, N]
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, :]
    return logits.float().masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1).mean(dim=1)


def layer_keys(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    projections: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The keys a decoder ``layer``'s attention computes for its input ``hidden_states`` ``[B, N, D]``:
    ``input_layernorm``, ``k_proj``, optional ``k_norm`` and RoPE, kv heads concatenated: ``[B, N, g c]``.
    ``projections``: the layer's own ``(q_proj, k_proj)`` outputs, if its attention already computed them.

    Example:
        >>> from transformers import LlamaConfig
        >>> from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
        >>> cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        ...                   intermediate_size=64)
        >>> layer, h = LlamaDecoderLayer(cfg, 0), torch.randn(1, 5, 32)
        >>> layer_keys(layer, h, LlamaRotaryEmbedding(cfg)(h, torch.arange(5)[None])).shape
        torch.Size([1, 5, 16])
    """
    _, k = _rotated_qk(layer, hidden_states, position_embeddings, slice(0, 1), projections)
    return k.transpose(1, 2).flatten(2)


def query_attention(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    key_mask: torch.Tensor | None = None,
    query_index: int | torch.Tensor = -1,
    projections: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention of one query token to every key, as decoder ``layer`` would compute it.

    ``layer`` is a Llama/Qwen2-style decoder layer (``input_layernorm``, ``self_attn`` with
    ``q_proj``, ``k_proj``, ``head_dim``, ``scaling``; optional ``q_norm``/``k_norm``);
    ``hidden_states`` is the layer's input ``[B, N, D]``; ``position_embeddings`` the
    ``(cos, sin)`` it receives. Returns softmax probabilities of the query at
    ``query_index`` (an int, or one index per sample ``[B]``: right-padded batches) over the
    ``N`` keys (masked where ``key_mask`` is False), averaged over heads: ``[B, N]``. Cost: one
    key projection, ``O(N d)`` per head, no ``N x N`` matrix.
    Keys after the query are masked, as causal attention would. ``projections``: the layer's
    ``q_proj``/``k_proj`` outputs for all tokens, if it already computed them (saves the key
    projection).

    Example:
        >>> from transformers import LlamaConfig
        >>> from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
        >>> cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        ...                   intermediate_size=64)
        >>> layer, h = LlamaDecoderLayer(cfg, 0), torch.randn(1, 5, 32)
        >>> rope = LlamaRotaryEmbedding(cfg)(h, torch.arange(5)[None])
        >>> round(float(query_attention(layer, h, rope).sum().detach()), 4)
        1.0
    """
    bsz, n, _ = hidden_states.shape
    if isinstance(query_index, torch.Tensor):
        qi = (query_index.to(hidden_states.device).long() % n).expand(bsz)
        rows = qi[:, None]
    else:
        qi = torch.full((bsz,), query_index % n, device=hidden_states.device)
        rows = slice(query_index % n, query_index % n + 1)
    q, k = _rotated_qk(layer, hidden_states, position_embeddings, rows, projections)
    # Scaled in the model's dtype, then the softmax in float (queries_attention scales in float).
    logits = _grouped_logits(q, k) * layer.self_attn.scaling
    return _causal_mean_softmax(logits, qi[:, None], key_mask)[:, 0]


def queries_attention(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_rows: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    projections: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention of several query tokens to every key, as decoder ``layer`` computes it: the rows
    ``query_rows`` ``[B, r]`` of its causal attention probabilities (softmax over the keys allowed by
    ``key_mask`` and causality), averaged over heads, ``[B, r, N]``. As :func:`query_attention`, from
    the layer's own norm, projections (or ``projections``, if its attention computed them) and RoPE;
    no ``N x N`` matrix.

    Example:
        >>> from transformers import LlamaConfig
        >>> from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
        >>> cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        ...                   intermediate_size=64)
        >>> layer, h = LlamaDecoderLayer(cfg, 0), torch.randn(1, 5, 32)
        >>> rope = LlamaRotaryEmbedding(cfg)(h, torch.arange(5)[None])
        >>> att = queries_attention(layer, h, rope, torch.tensor([[2, 4]]))
        >>> att.shape, bool(att[0, 0, 3:].sum() == 0)
        (torch.Size([1, 2, 5]), True)
    """
    bsz = hidden_states.shape[0]
    rows = query_rows.to(hidden_states.device).long().expand(bsz, -1)
    q, k = _rotated_qk(layer, hidden_states, position_embeddings, rows, projections)
    return _causal_mean_softmax(_grouped_logits(q, k).float() * layer.self_attn.scaling, rows, key_mask)


def cls_attention(attn: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Attention of the [CLS] token (position 0) to every token of a ViT attention module.

    ``attn`` is the module (CLIP/SigLIP-style: ``q_proj``, ``k_proj``, ``num_heads``,
    ``head_dim``, ``scale``; optional ``q_norm``/``k_norm``) and ``hidden_states`` the input it
    receives ``[B, N, D]``. Returns the CLS row of the head-averaged attention probabilities,
    ``[B, N]`` (the first column is CLS attending to itself).

    Example:
        >>> from transformers import CLIPVisionConfig
        >>> from transformers.models.clip.modeling_clip import CLIPAttention
        >>> attn = CLIPAttention(CLIPVisionConfig(hidden_size=32, num_attention_heads=4))
        >>> cls_attention(attn, torch.randn(2, 10, 32)).shape
        torch.Size([2, 10])
    """
    bsz, n, _ = hidden_states.shape
    hd = attn.head_dim
    q, k = attn.q_proj(hidden_states[:, :1]), attn.k_proj(hidden_states)
    norm = getattr(attn, "q_norm", None)
    norm = None if isinstance(norm, nn.Identity) else norm
    # InternVL normalizes q and k over all heads together, other towers per head.
    whole = norm is not None and getattr(norm, "weight", None) is not None and norm.weight.shape[-1] == q.shape[-1]
    if whole:
        q, k = norm(q), attn.k_norm(k)
    q = q.view(bsz, 1, -1, hd).transpose(1, 2)
    k = k.view(bsz, n, -1, hd).transpose(1, 2)
    if norm is not None and not whole:
        q, k = norm(q), attn.k_norm(k)
    scale = getattr(attn, "scale", None) or getattr(attn, "scaling", hd**-0.5)
    logits = torch.matmul(q, k.transpose(-1, -2)).squeeze(2) * scale  # [B, H, N]
    return _mean_head_softmax(logits, None)


def attention_pagerank(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    key_mask: torch.Tensor | None = None,
    iters: int = 5,
    temperature: float = 0.1,
    chunk: int = 128,
    projections: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Token importance by PageRank over a decoder layer's own causal attention (AIM's rule).

    With ``M = softmax(q k^T / sqrt(d) / temperature)`` over keys (causal, ``key_mask``),
    all tokens as queries, per head: ``s <- s M`` from a uniform start, ``iters`` times; heads
    are combined by root mean square. Returns ``[B, N]``. ``projections``: the layer's
    ``q_proj``/``k_proj`` outputs, if its attention already computed them.

    ``M`` is never held whole: it is computed once, in blocks of ``chunk`` query rows, so
    memory is ``O(chunk N)`` per head and the cost one causal ``q k^T`` (``N^2 h c`` FLOPs).
    This works because ``M`` is lower triangular: ``(s M)_j`` sums over rows ``i >= j`` only,
    so with blocks taken from the last rows up, every iteration's scores of a block's rows are
    complete when the block is reached, and all ``iters`` iterations use the block at once
    (one matrix product for its part left of the diagonal).

    Example:
        >>> from transformers import LlamaConfig
        >>> from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
        >>> cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        ...                   intermediate_size=64)
        >>> layer, h = LlamaDecoderLayer(cfg, 0), torch.randn(2, 9, 32)
        >>> rope = LlamaRotaryEmbedding(cfg)(h, torch.arange(9)[None])
        >>> attention_pagerank(layer, h, rope, chunk=4).shape
        torch.Size([2, 9])
    """
    attn = layer.self_attn
    bsz, n, _ = hidden_states.shape
    device = hidden_states.device
    with torch.no_grad():
        q, k = (t.float() for t in _rotated_qk(layer, hidden_states, position_embeddings, slice(None), projections))
        hd, heads, kv_heads = q.shape[-1], q.shape[1], k.shape[1]
        q = q.view(bsz, kv_heads, heads // kv_heads, n, hd) * (attn.scaling / temperature)
        k = k[:, :, None]  # [B, KV, 1, N, d]: shared by the query heads of its group
        valid = torch.ones(bsz, n, dtype=torch.bool, device=device) if key_mask is None else key_mask.bool()
        padded = not bool(valid.all())
        def block(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
            """Rows ``rows`` of ``M`` over the keys up to the last of them, unnormalized
            (``[B, KV, G, c, rows.stop]``), and their sums."""
            logits = torch.matmul(q[..., rows, :], k[..., : rows.stop, :].transpose(-1, -2))
            # Keys before the block are all visible to its rows: only the block's own square
            # needs the causal mask (and every key column the padding mask).
            future = torch.ones(rows.stop - rows.start, rows.stop - rows.start, dtype=torch.bool,
                                device=device).triu_(1)
            square = logits[..., rows.start:]
            square.masked_fill_(future, -1e30)
            keys = valid[:, None, None, None, : rows.stop]
            if padded:
                logits.masked_fill_(~keys, -1e30)
            # A softmax written out for speed on CPUs: the low temperature spreads logits far
            # apart, and exp() of the very negative ones yields denormal floats, many times
            # slower. So logits are floored at e^-80 of the row's largest (a change below float
            # precision), and masked keys are zeroed after the exponential.
            probs = logits.sub_(logits.amax(dim=-1, keepdim=True)).clamp_min_(-80.0).exp_()
            square.masked_fill_(future, 0.0)
            if padded:
                probs.mul_(keys)
            return probs, probs.sum(dim=-1)

        # scores[t]: the scores after t iterations, filled in from the last rows up.
        scores = [q.new_full((bsz, kv_heads, heads // kv_heads, n), 1.0 / n)]
        scores += [torch.zeros_like(scores[0]) for _ in range(iters)]
        for start in reversed(range(0, n, chunk)):
            rows = slice(start, min(n, start + chunk))
            m, total = block(rows)
            # Normalize on the small side: each row's weight, not the block. A padding query
            # (no visible key) contributes nothing.
            weight = torch.where(valid[:, None, None, rows], 1.0 / total.clamp_min(1e-30), 0.0)
            # Within the block's own square the iterations depend on each other: one at a time.
            # Its contributions to earlier keys do not feed back into the block: all at once.
            square, before = m[..., start:], m[..., :start]
            weights = []
            for t in range(iters):
                weights.append(scores[t][..., rows] * weight)
                scores[t + 1][..., rows] += torch.matmul(weights[-1][..., None, :], square).squeeze(-2)
            if start:
                spread = torch.matmul(torch.stack(weights, dim=-2), before)  # [B, KV, G, iters, start]
                for t in range(iters):
                    scores[t + 1][..., :start] += spread[..., t, :]
        return scores[-1].view(bsz, heads, n).pow(2).mean(dim=1).sqrt()
