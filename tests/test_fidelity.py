"""Each method's default against a reference of its official code, on tiny LLaVA-1.5-shaped models.

The references below are written from the official repositories (file and lines cited at
each); they run on the *unpatched* model's own modules and share nothing with vtc but the
model. Images are 336px with 14px patches (576 tokens, as LLaVA-1.5), so the official counts
(VisionZip's 54/10 splits, PyramidDrop's truncation) are the real ones. docs/fidelity.md
lists what each test proves.
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
def _model(attn: str, vision_layers: int = 4, layers: int = 2, kv_heads: int = 2):
    return tiny_llava(image_size=336, vision_layers=vision_layers, layers=layers, kv_heads=kv_heads, attn=attn)


def tower_pass(model, pixel_values, layers: list[int]):
    """The tower's hidden states, and for each of ``layers`` its attention probabilities
    ``[B, H, T, T]`` and its raw keys ``[B, H, T, hd]``, recomputed from the inputs the
    layer's attention module receives (the official code reads ``output_attentions``; this is
    the same softmax(q k^T * scale) whatever the attention backend)."""
    encoder = model.model.vision_tower.encoder
    seen, handles = {}, []
    for i in layers:
        def grab(module, args, kwargs, i=i):
            seen[i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        handles.append(encoder.layers[i].self_attn.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    probs, keys = {}, {}
    for i, x in seen.items():
        attn = encoder.layers[i].self_attn
        b, t, _ = x.shape
        with torch.no_grad():
            q = (attn.q_proj(x) * attn.scale).view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)
        probs[i], keys[i] = torch.softmax(q @ k.transpose(-1, -2), dim=-1), k
    return out.hidden_states, probs, keys


def llm_input(model, inputs, method, **params):
    """What the patched model hands the language model (prefill), and vtc's record."""
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["inputs_embeds"]) if not seen else None, with_kwargs=True)
    try:
        with vtc.compressed(model, method, **params), torch.no_grad():
            out = model(**inputs)
            stats = vtc.stats(model)
    finally:
        handle.remove()
    return seen[0], stats, out.logits


# -- VisionZip ---------------------------------------------------------------------------
def official_visionzip(model, pixel_values, dominant: int, contextual: int):
    """dvlab-research/VisionZip @3151f6d: ``visionzip/main.py`` L5-7 (``dominant_num = dominant - 1``),
    ``visionzip/utils.py`` L24 and L89 (metric = raw keys averaged over heads) and L191 (taken at
    layer -2), ``visionzip/clip_encoder.py`` L43-83 (the selection and merge), ``llava_arch.py``
    L32-33 (projected after). Returns the projected sequence ``[B, k, D]``, the dominant patches'
    and the targets' grid indices (0-based patches, CLS excluded)."""
    depth = model.config.vision_config.num_hidden_layers
    hidden, probs, keys = tower_pass(model, pixel_values, [depth - 2])
    states, attn, metric = hidden[-2], probs[depth - 2], keys[depth - 2].mean(dim=1)
    n_dom = dominant - 1
    # CLS row to the patches, summed over heads; top n_dom patches (+1: CLS is token 0); CLS kept.
    chosen = attn[:, :, 0, 1:].sum(dim=1).topk(n_dom, dim=1).indices + 1
    keep = torch.zeros(states.shape[:2], dtype=torch.bool)
    keep[:, 0] = True
    keep[torch.arange(states.shape[0])[:, None], chosen] = True
    out, dom_grid, target_grid = [], [], []
    for b in range(states.shape[0]):
        dom = states[b][keep[b]]  # CLS first, then the chosen patches in grid order
        rest_ids = (~keep[b]).nonzero()[:, 0]
        rest, unit = states[b][rest_ids], metric[b][rest_ids]
        unit = unit / unit.norm(dim=-1, keepdim=True)
        step = max(1, rest.shape[0] // contextual)
        targets = list(range(0, rest.shape[0], step))[:contextual]
        others = [j for j in range(rest.shape[0]) if j not in targets]
        best = (unit[others] @ unit[targets].T).argmax(dim=1)
        ctx = []
        for c, t in enumerate(targets):
            group = rest[others][best == c]
            ctx.append(rest[t] + (group.mean(dim=0) if group.shape[0] else torch.zeros_like(rest[t])))
        out.append(torch.cat([dom, torch.stack(ctx)]))
        dom_grid.append(keep[b, 1:].nonzero()[:, 0])
        target_grid.append(rest_ids[targets] - 1)
    with torch.no_grad():
        projected = model.model.multi_modal_projector(torch.stack(out))
    return projected, dom_grid, target_grid


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize(("budget", "dominant", "contextual"), [(64, 54, 10), (128, 108, 20), (192, 162, 30)])
def test_visionzip_hands_the_llm_the_official_sequence(attn, budget, dominant, contextual):
    model = _model(attn)
    inputs = tiny_inputs(model)
    ref, dom, targets = official_visionzip(model, inputs["pixel_values"], dominant, contextual)
    embeds, stats, _ = llm_input(model, inputs, "visionzip", budget=budget)
    start = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0, 0])
    torch.testing.assert_close(embeds[0, start: start + budget], ref[0], atol=1e-5, rtol=1e-5)
    kept = stats.kept["vision"][0]  # the [CLS] stand-in, the dominant patches, the targets
    assert torch.equal(kept[1:dominant], dom[0]) and torch.equal(kept[dominant:], targets[0])
    assert embeds.shape[1] == inputs["input_ids"].shape[1] - 576 + budget


# -- VTC-CLS -----------------------------------------------------------------------------
def official_vtc_cls(model, pixel_values, keep: int, start: int | None):
    """THU-MIG/VTC-CLS @f4d83a1: ``llava/model/multimodal_encoder/clip_encoder.py``
    ``cls_token_only`` (CLS row of each layer's head-mean attention, summed over
    ``attentions[start_layer:-1]``), ``llava/eval/model_vqa_loader.py`` (``--layer`` default
    "16"), ``llava/model/llava_arch.py`` ``encode_images`` (top ``token_num``, then sorted).
    ``start=None``: FasterVLM's single layer -2 (``attentions[-2]``)."""
    depth = model.config.vision_config.num_hidden_layers
    layers = list(range(depth))[start:-1] if start is not None else [depth - 2]
    _, probs, _ = tower_pass(model, pixel_values, layers)
    score = sum(probs[i].mean(dim=1)[:, 0, 1:] for i in layers)
    return score.topk(keep, dim=1).indices.sort(dim=1).values


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("single", [False, True], ids=["official-layers-16-22", "fastervlm-layer-22"])
def test_vtc_cls_keeps_the_official_patches(attn, single):
    model = _model(attn, vision_layers=24)
    inputs = tiny_inputs(model, batch=2, seed=3)
    params = {"layers": (-2,)} if single else {}
    if not single:
        assert vtc.plan(model, "vtc_cls", budget=64).stages[0].scorer.layers == tuple(range(16, 23))
    for keep in (64, 192):
        ref = official_vtc_cls(model, inputs["pixel_values"], keep, None if single else 16)
        _, stats, _ = llm_input(model, inputs, "vtc_cls", budget=keep, **params)
        assert torch.equal(torch.stack(stats.kept["vision"]), ref)


# -- PyramidDrop -------------------------------------------------------------------------
def _prompt_embeddings(model, inputs) -> tuple[torch.Tensor, int, int]:
    """The LLM's input embeddings of a one-image prompt (image features scattered into the
    placeholders, as the official LLaVA code does), the image's first row and its length."""
    ids = inputs["input_ids"]
    image = ids[0] == model.config.image_token_id
    with torch.no_grad():
        h = model.model.language_model.embed_tokens(ids)
        h[0, image] = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    return h, int(image.nonzero()[0, 0]), int(image.sum())


def official_pdrop(model, inputs, layer_list: list[int], ratio: float):
    """Cooperx521/PyramidDrop @6444f30, ``llava/model/modeling_llama_pdrop.py``: after decoder layer
    ``rank_layer - 1`` (L1219-1240) the image tokens are ranked (``pdrop_rank_drop``, L1291-1420)
    by the last instruction token's attention computed with layer ``rank_layer``'s
    ``input_layernorm``, ``q_proj``, ``k_proj`` and RoPE at the current contiguous positions,
    softmax over the sequence, mean over heads; ``int(N * ratio_list[stage + 1])`` are kept in
    order (L1306-1307, L1405-1407) and positions restart contiguously. ``ratio_list`` is
    ``[1, ratio, ratio**2, ...]`` (``model_vqa_loader.py`` L94-96, scripts pass lambda powers).
    Returns each stage's kept grid indices and the last row's logits."""
    lm = model.model.language_model
    h, start, n = _prompt_embeddings(model, inputs)
    grid = torch.arange(n)  # original grid index of each image row still present
    ratios = [ratio**i for i in range(len(layer_list) + 1)]
    kept = []
    with torch.no_grad():
        for idx, layer in enumerate(lm.layers):
            t = h.shape[1]
            pos = torch.arange(t)[None]
            mask = torch.full((t, t), torch.finfo(h.dtype).min).triu(1)[None, None]
            h = layer(h, attention_mask=mask, position_embeddings=lm.rotary_emb(h, pos), position_ids=pos)
            if idx + 1 not in layer_list:
                continue
            stage = layer_list.index(idx + 1)
            cur, nxt = int(n * ratios[stage]), int(n * ratios[stage + 1])
            nxt_layer = lm.layers[idx + 1]
            attn = nxt_layer.self_attn
            x = nxt_layer.input_layernorm(h)
            hd = attn.head_dim
            q = attn.q_proj(x).view(1, t, -1, hd).transpose(1, 2)
            k = attn.k_proj(x).view(1, t, -1, hd).transpose(1, 2)
            cos, sin = lm.rotary_emb(h, pos)
            q = q * cos[:, None] + _rotate(q) * sin[:, None]
            k = k * cos[:, None] + _rotate(k) * sin[:, None]
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            w = torch.softmax(q[:, :, -1:] @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1).mean(dim=1)[0, 0]
            top = w[start: start + cur].topk(nxt).indices.sort().values
            rows = torch.cat([torch.arange(start), start + top, torch.arange(start + cur, t)])
            h, grid = h[:, rows], grid[top]
            kept.append(grid)
        logits = model.lm_head(lm.norm(h))[0, -1]
    return kept, logits


def _rotate(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("ratio", [0.5, 0.4, 0.3])
def test_pdrop_keeps_the_official_tokens(attn, ratio):
    # Vicuna-like multi-head attention (the official code has no grouped-query path), 8 layers.
    model = _model(attn, vision_layers=2, layers=8, kv_heads=4)
    inputs = tiny_inputs(model, seed=5)
    layers = [2, 4, 6]  # L/4, L/2, 3L/4 as the official 8/16/24 of 32
    ref, ref_logits = official_pdrop(model, inputs, layers, ratio)
    assert [g.numel() for g in ref] == [int(576 * ratio**i) for i in (1, 2, 3)]
    _, stats, logits = llm_input(model, inputs, "pdrop", ratio=ratio)
    assert vtc.plan(model, "pdrop", ratio=ratio).stages[0].where == "layer:2"
    for layer, want in zip(layers, ref):
        assert torch.equal(stats.kept[f"layer:{layer}"][0], want)
    torch.testing.assert_close(logits[0, -1], ref_logits, atol=1e-4, rtol=1e-4)


# -- FastV -------------------------------------------------------------------------------
def official_fastv(model, inputs, agg_layer: int, rank: int):
    """pkunlp-icler/FastV @d165972,
    ``src/transformers/src/transformers/models/llama/modeling_llama.py``, the in-place variant
    (``fast_v_inplace``, L717-760): decoder layers run unchanged up to ``AGG_LAYER`` (K); at
    ``idx == AGG_LAYER`` the attention probabilities layer K-1 returned (``layer_outputs[1]``,
    L738: eager ``softmax(q k^T / sqrt(hd) + causal mask)`` in fp32 after RoPE and ``repeat_kv``,
    L306-349) are averaged over heads for sample 0 (L740), the last row taken (L742), cut to the
    image span ``[SYS_LENGTH, SYS_LENGTH + IMAGE_TOKEN_LENGTH)`` (L744), its top ``ATTENTION_RANK`` kept
    (L746) with every other token, sorted (L748-750); the survivors keep their original
    positions (``position_ids = keep_indexs``, L756) under a fresh causal mask (L758-760).
    ``rank`` is ``fast_v_attention_rank``, a count (the lmms-eval script
    ``src/FastV/lmms-eval/fastv_kvcache.py`` L125 passes ``int(576 * ratio)``).
    Returns the kept grid indices and the last row's logits."""
    lm = model.model.language_model
    h, start, n = _prompt_embeddings(model, inputs)
    with torch.no_grad():
        t = h.shape[1]
        pos = torch.arange(t)[None]
        causal = torch.full((t, t), torch.finfo(h.dtype).min).triu(1)[None, None]
        mask, kept, probs = causal, None, None
        for idx, layer in enumerate(lm.layers):
            if idx == agg_layer:
                w = probs.mean(dim=1)[0][-1]
                top = w[start: start + n].topk(rank).indices + start
                keep = torch.cat([torch.arange(start), top, torch.arange(start + n, t)]).sort().values
                h, pos = h[:, keep], keep[None]
                mask = causal[..., : keep.numel(), : keep.numel()]
                kept = top.sort().values - start
            if idx == agg_layer - 1:
                logits = _attention_logits(layer, h, lm.rotary_emb(h, pos)) + mask
                probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            h = layer(h, attention_mask=mask, position_embeddings=lm.rotary_emb(h, pos), position_ids=pos)
        logits = model.lm_head(lm.norm(h))[0, -1]
    return kept, logits


def _attention_logits(layer, h, cos_sin):
    """``q k^T / sqrt(hd)`` of a Llama-style layer as FastV's ``LlamaAttention.forward`` computes
    it (``modeling_llama.py`` L306-333): q/k projections of the normed input, RoPE, ``repeat_kv``."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    b, t, _ = x.shape
    hd = attn.head_dim
    q = attn.q_proj(x).view(b, t, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, -1, hd).transpose(1, 2)
    cos, sin = cos_sin
    q = q * cos[:, None] + _rotate(q) * sin[:, None]
    k = k * cos[:, None] + _rotate(k) * sin[:, None]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return q @ k.transpose(-1, -2) / math.sqrt(hd)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_fastv_keeps_the_official_tokens(attn, kv_heads):
    model = _model(attn, vision_layers=2, layers=6, kv_heads=kv_heads)
    inputs = tiny_inputs(model, seed=7)
    for agg_layer, rank in [(2, 288), (1, 100), (3, 173), (5, 64)]:
        ref, ref_logits = official_fastv(model, inputs, agg_layer, rank)
        _, stats, logits = llm_input(model, inputs, "fastv", layer=agg_layer, keep=rank)
        assert torch.equal(stats.kept[f"layer:{agg_layer}"][0], ref), (agg_layer, rank)
        torch.testing.assert_close(logits[0, -1], ref_logits, atol=1e-4, rtol=1e-4)
    # R as a ratio: the official lmms-eval script keeps int(576 * ratio) (172 at 0.3, not 173).
    ref, _ = official_fastv(model, inputs, 3, int(576 * 0.3))
    _, stats, _ = llm_input(model, inputs, "fastv", layer=3, keep=0.3)
    assert torch.equal(stats.kept["layer:3"][0], ref)


def test_fastv_defaults_are_the_papers():
    model = _model("sdpa", vision_layers=2, layers=6)
    stage = vtc.plan(model, "fastv").stages[0]
    assert (stage.where, stage.scorer.layers, stage.keep, stage.positions) == ("layer:2", (1,), 288, "keep")


# -- HiRED -------------------------------------------------------------------------------
def official_hired(model, inputs, rate: float, alpha: float) -> list[torch.Tensor]:
    """hasanar1f/HiRED @502d6dd, ``transformers/src/transformers/models/llava_next/modeling_llava_next.py``:
    [CLS] attention of vision layers 0 and depth-2 (``vit_top_layer = 0``, ``vit_bottom_layer = 22``,
    L966-967) recomputed from the hooked ``q_proj``/``k_proj`` outputs as
    ``softmax(q k^T * hd**-0.5)`` (``ViT_Attn_Hook``, L48-96), row 0, the last 576 columns, summed
    over heads (L528-535); per image ``HiRED_token_selection`` (L538-557): budget
    ``int(crops * 576 * rate)``, base ``min(int(budget * alpha), 576)`` by the late layer, tiles
    ``min(rest, (crops - 1) * 576)`` shared by ``HiRED_sub_img_budgets`` (L508-516: the top
    ``int(576 * (1 - alpha))`` early tokens, the flat map reshaped to (rows, cols, -1) and
    summed, ``(ratio * budget).int()`` capped at 576), each tile its top by the late layer;
    packed with ``image_newline=None`` (L1008-1013, ``pack_HiRED_image_features`` L804-851: the
    base image's kept tokens, then the tile grid's row by row, no row ends). Returns each image's
    kept tokens as positions among the model's packed tokens (row ends included), for images
    that fill their canvas (no unpadding)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    cfg = model.config
    encoder = model.model.vision_tower.encoder  # the fork's vision_tower.vision_model.encoder
    depth, heads = cfg.vision_config.num_hidden_layers, cfg.vision_config.num_attention_heads
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    grids = [get_anyres_image_grid_shape(hw.tolist(), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
             for hw in inputs["image_sizes"]]
    crops = [1 + r * c for r, c in grids]
    pixels = torch.cat([p[:n] for p, n in zip(inputs["pixel_values"], crops)])
    cls = {}
    for layer in (0, depth - 2):
        out, handles = {}, []
        for name in ("q_proj", "k_proj"):
            module = getattr(encoder.layers[layer].self_attn, name)
            handles.append(module.register_forward_hook(lambda m, a, o, name=name, out=out: out.__setitem__(name, o)))
        with torch.no_grad():
            model.model.vision_tower(pixels, output_hidden_states=True)
        for h in handles:
            h.remove()
        b, t, d = out["q_proj"].shape
        q, k = (out[n].view(b, t, heads, d // heads).transpose(1, 2) for n in ("q_proj", "k_proj"))
        attn = torch.softmax(q @ k.transpose(-2, -1) * (d // heads) ** -0.5, dim=-1)
        cls[layer] = attn[:, :, 0, -g * g:].sum(dim=1).split(crops)
    kept = []
    for i, ((rows, cols), n) in enumerate(zip(grids, crops)):
        top, bottom = cls[0][i], cls[depth - 2][i]
        mask = torch.zeros(n, g * g, dtype=torch.bool)
        total = int(n * g * g * rate)
        full = min(int(total * alpha), g * g)
        sub = min(total - full, (n - 1) * g * g)
        mask[0, bottom[0].topk(full).indices] = True
        if sub > 0:
            spatial = torch.zeros(g * g, dtype=torch.bool)
            spatial[top[0].topk(int(g * g * (1 - alpha))).indices] = True
            counts = spatial.reshape(rows, cols, -1).sum(dim=-1).reshape(-1)
            budgets = torch.clamp((counts / counts.sum() * sub).int(), max=g * g)
            for t, k in enumerate(budgets):
                mask[t + 1, bottom[t + 1].topk(int(k)).indices] = True
        base = mask[0].nonzero()[:, 0]
        tile, patch = mask[1:].nonzero().unbind(1)
        row = (tile // cols) * g + patch // g
        col = (tile % cols) * g + patch % g
        kept.append(torch.cat([base, (g * g + row * (cols * g + 1) + col).sort().values]))
    return kept


@pytest.mark.parametrize("attn", ATTN)
def test_hired_official_keeps_the_official_tokens(attn):
    from vtc.testing import tiled_inputs, tiny_llava_next

    model = tiny_llava_next(tile=112, vision_layers=4, layers=2, attn=attn)
    images = [[(112, 224), (224, 224), (224, 112)], [(224, 224), (112, 224), (224, 112)]]
    inputs = tiled_inputs(model, images=images, seed=4)
    for rate, alpha in [(0.2, 0.5), (0.35, 0.3), (0.1, 0.8)]:
        ref = official_hired(model, inputs, rate, alpha)
        embeds, stats, _ = llm_input(model, inputs, "hired", budget=rate, alpha=alpha, official=True)
        got = stats.kept["vision"]
        assert len(got) == len(ref) == 6
        for mine, want in zip(got, ref):
            assert torch.equal(mine, want), (rate, alpha)
        kept = [sum(k.numel() for k in ref[:3]), sum(k.numel() for k in ref[3:])]
        text = (inputs["input_ids"] != model.config.image_token_id).sum(dim=1)
        assert embeds.shape[1] == int((text + torch.tensor(kept)).max())


def test_hired_official_needs_a_rate_and_the_official_regions():
    from vtc.testing import tiny_llava_next

    model = tiny_llava_next()
    with pytest.raises(vtc.BudgetError, match="official=True sizes each image's budget as int.crops . 576 . rate."):
        vtc.plan(model, "hired", budget=40, official=True)
    with pytest.raises(vtc.VtcError, match="official=True uses the official regions"):
        vtc.plan(model, "hired", regions="tiles", official=True)
    assert dict(vtc.plan(model, "hired", official=True).stages[0].options)["rate"] == 0.2
