"""Tiny LLaVA models with random weights, built from config classes (no download).

Used by the tests, the demo and the prefill benchmark.

Example:
    >>> from vtc.testing import tiny_llava, tiny_inputs
    >>> model = tiny_llava()
    >>> inputs = tiny_inputs(model, batch=1)
    >>> model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]
    True
"""

from __future__ import annotations

import torch

from vtc.ops import runs


def tiny_llava(
    *,
    image_size: int = 56,
    patch_size: int = 14,
    vision_layers: int = 4,
    vision_hidden: int = 32,
    layers: int = 6,
    hidden: int = 64,
    intermediate: int | None = None,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 128,
    text_model: str = "llama",
    attn: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """A randomly initialised ``LlavaForConditionalGeneration`` of the given shape, in eval mode.

    The image token is the last vocabulary id; ``(image_size // patch_size) ** 2`` tokens per image.
    """
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_hidden_layers=vision_layers,
        num_attention_heads=4, image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden,
    )
    text = _text_config(text_model, layers=layers, hidden=hidden, intermediate=intermediate, heads=heads,
                        kv_heads=kv_heads, vocab=vocab)
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=vocab - 1,
        image_seq_length=(image_size // patch_size) ** 2,
    )
    return _instantiate(LlavaForConditionalGeneration, config, attn, dtype)


# Image layouts tiny_inputs takes turns with, per tiled family (tiles of the tiny models; Qwen2.5-VL:
# (rows, cols) of 14px patches, i.e. 16, 24 and 24 tokens after the 2x2 merger).
LAYOUTS = {"llava_next": [(56, 112), (112, 112), (112, 56)], "internvl": [3, 5, 2],
           "qwen2_5_vl": [(8, 8), (8, 12), (12, 8)], "qwen3_vl": [(8, 8), (8, 12), (12, 8)]}


def tiny_model(family: str = "llava", **kwargs):
    """A tiny random model of ``family`` (``llava``, ``llava_next``, ``internvl``, ``qwen2_5_vl``, ``qwen3_vl``).

    Example:
        >>> type(tiny_model("internvl", layers=1, vision_layers=1)).__name__
        'InternVLForConditionalGeneration'
    """
    if family == "llava_onevision":
        return tiny_llava_onevision(**kwargs)
    builders = {"llava": tiny_llava, "llava_next": tiny_llava_next, "internvl": tiny_internvl,
                "qwen2_5_vl": tiny_qwen2_5_vl, "qwen3_vl": tiny_qwen3_vl}
    if family == "internvl":
        kwargs.setdefault("text_model", "qwen2")
    return builders[family](**kwargs)


def split_inputs(model, inputs: dict) -> list[dict]:
    """Each sample of a batch made by :func:`tiny_inputs` or :func:`tiled_inputs` on its own, unpadded.

    Example:
        >>> m = tiny_llava(layers=1, vision_layers=1)
        >>> [s["input_ids"].shape for s in split_inputs(m, tiny_inputs(m, batch=2, pad=[0, 2]))]
        [torch.Size([1, 30]), torch.Size([1, 28])]
    """
    cfg = model.config
    if "image_grid_thw" in inputs:
        return _split_qwen(inputs)
    if cfg.model_type == "llava_onevision":
        return _split_onevision(model, inputs)
    # How many entries of pixel_values each image takes: one, or (InternVL) one per tile.
    per_image = [[] for _ in inputs["input_ids"]]
    for b, rows in runs(inputs["input_ids"] == cfg.image_token_id):
        per_image[b].append(rows.numel() // cfg.image_seq_length if cfg.model_type == "internvl" else 1)
    out, start = [], 0
    for b, sizes in enumerate(per_image):
        real = inputs["attention_mask"][b].bool()
        sample = {"input_ids": inputs["input_ids"][b: b + 1, real],
                  "attention_mask": inputs["attention_mask"][b: b + 1, real],
                  "pixel_values": inputs["pixel_values"][start: start + sum(sizes)]}
        if "image_sizes" in inputs:
            sample["image_sizes"] = inputs["image_sizes"][start: start + sum(sizes)]
        start += sum(sizes)
        out.append(sample)
    return out


def join_inputs(samples: list[dict]) -> dict:
    """Batch single samples, left-padding the prompts (and LLaVA-NeXT's tile axis).

    Example:
        >>> m = tiny_llava(layers=1, vision_layers=1)
        >>> join_inputs([tiny_inputs(m, text=4), tiny_inputs(m, text=9)])["attention_mask"].sum(1)
        tensor([20, 25])
    """
    width = max(s["input_ids"].shape[1] for s in samples)

    def left(x, value=0):
        return torch.cat([x.new_full((1, width - x.shape[1]), value), x], dim=1)

    out = {"input_ids": torch.cat([left(s["input_ids"]) for s in samples]),
           "attention_mask": torch.cat([left(s["attention_mask"]) for s in samples])}
    pixels = [s["pixel_values"] for s in samples]
    if pixels[0].dim() == 5:  # LLaVA-NeXT: [images, tiles, 3, H, W]
        tiles = max(p.shape[1] for p in pixels)
        pixels = [torch.cat([p, p.new_zeros(p.shape[0], tiles - p.shape[1], *p.shape[2:])], 1) for p in pixels]
    out["pixel_values"] = torch.cat(pixels)
    if "image_grid_thw" in samples[0]:
        out["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in samples])
        out["mm_token_type_ids"] = torch.cat([left(s["mm_token_type_ids"]) for s in samples])
    if "image_sizes" in samples[0]:
        out["image_sizes"] = torch.cat([s["image_sizes"] for s in samples])
    for name in ("batch_num_images", "pixel_values_videos"):  # LLaVA-OneVision
        if any(name in s for s in samples):
            out[name] = torch.cat([s[name] for s in samples if name in s])
    return out


def tiny_inputs(
    model,
    *,
    batch: int = 1,
    text: int = 12,
    images: int = 1,
    pad: list[int] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random prompts with ``images`` image runs each, left-padded by ``pad[b]`` tokens.

    Returns ``input_ids``, ``attention_mask`` and ``pixel_values`` (``[batch * images, 3, H, W]``).
    For a tiled family (LLaVA-NeXT, InternVL) the images take turns among three layouts of
    different aspect ratios or tile counts (see :data:`LAYOUTS`), through :func:`tiled_inputs`.
    """
    cfg = model.config
    if cfg.model_type in LAYOUTS:
        options = LAYOUTS[cfg.model_type]
        layout = [[options[(b + i) % len(options)] for i in range(images)] for b in range(batch)]
        if cfg.model_type == "llava_onevision":
            return onevision_inputs(model, images=layout, text=text, pad=pad, seed=seed)
        if cfg.model_type in ("qwen2_5_vl", "qwen3_vl"):
            return qwen_inputs(model, images=layout, text=text, pad=pad, seed=seed)
        return tiled_inputs(model, images=layout, text=text, pad=pad, seed=seed)
    n = cfg.image_seq_length
    size = cfg.vision_config.image_size
    gen = torch.Generator().manual_seed(seed)
    pad = pad or [0] * batch
    width = max(pad)
    rows, masks = [], []
    for b in range(batch):
        words = torch.randint(3, cfg.image_token_id, (text,), generator=gen)
        pieces, cut = [], torch.linspace(0, text, images + 2).long().tolist()
        for i in range(images):
            pieces += [words[cut[i] : cut[i + 1]], torch.full((n,), cfg.image_token_id)]
        pieces.append(words[cut[images] :])
        seq = torch.cat(pieces)
        extra = width - pad[b]  # samples with less padding get more text, so lengths match
        seq = torch.cat([torch.randint(3, cfg.image_token_id, (extra,), generator=gen), seq])
        rows.append(torch.cat([torch.zeros(pad[b], dtype=torch.long), seq]))
        masks.append(torch.cat([torch.zeros(pad[b], dtype=torch.long), torch.ones(len(seq), dtype=torch.long)]))
    pixel = torch.randn(batch * images, 3, size, size, generator=gen).to(model.dtype)
    return {"input_ids": torch.stack(rows), "attention_mask": torch.stack(masks), "pixel_values": pixel}


def llava15_shaped(*, width: int = 256, layers: int = 32, vision_layers: int = 24, vision_width: int = 256,
                   attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0, head_dim: int = 32):
    """LLaVA-1.5-7B's geometry at reduced width: 336px / patch 14 = 576 tokens per image,
    a 24-layer tower read at layer -2, a 32-layer LLM (MLP ratio 11008/4096, head size
    ``head_dim``; LLaVA-1.5-7B's is 128).

    Example:
        >>> llava15_shaped(width=64, layers=4, vision_layers=3, vision_width=32).config.image_seq_length
        576
    """
    return tiny_llava(
        image_size=336, patch_size=14, vision_layers=vision_layers, vision_hidden=vision_width, layers=layers,
        hidden=width, intermediate=int(width * 11008 / 4096), heads=max(1, width // head_dim),
        kv_heads=max(1, width // head_dim), vocab=32064, attn=attn, dtype=dtype, seed=seed,
    )


def _instantiate(model_class, config, attn: str, dtype: torch.dtype):
    """The model of ``config`` with random weights, in eval mode, attention ``attn`` everywhere."""
    config._attn_implementation = attn
    model = model_class(config).to(dtype).eval()
    model.set_attn_implementation(attn)
    return model


def _text_config(text_model: str, *, layers: int, hidden: int, intermediate: int | None, heads: int, kv_heads: int,
                 vocab: int):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        text_model, hidden_size=hidden, intermediate_size=intermediate or hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
        max_position_embeddings=8192, pad_token_id=0,
    )


def tiny_llava_next(
    *,
    layers: int = 6,
    hidden: int = 64,
    intermediate: int | None = None,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 128,
    vision_layers: int = 4,
    vision_hidden: int = 32,
    tile: int = 56,
    patch_size: int = 14,
    text_model: str = "llama",
    attn: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """A randomly initialised ``LlavaNextForConditionalGeneration`` (CLIP tower, anyres tiles), in eval mode.

    Tiles are ``tile`` px; the pinpoints ``[[tile, 2 tile], [2 tile, tile], [2 tile, 2 tile]]`` give 1x2, 2x1
    and 2x2 grids. The image token is the last vocabulary id; features are read at layer -2, CLS dropped.
    """
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_hidden_layers=vision_layers,
        num_attention_heads=4, image_size=tile, patch_size=patch_size, projection_dim=vision_hidden,
    )
    text = _text_config(text_model, layers=layers, hidden=hidden, intermediate=intermediate, heads=heads,
                        kv_heads=kv_heads, vocab=vocab)
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_index=vocab - 1,
        image_grid_pinpoints=[[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]],
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=(tile // patch_size) ** 2,
    )
    return _instantiate(LlavaNextForConditionalGeneration, config, attn, dtype)


def tiny_internvl(
    *,
    layers: int = 6,
    hidden: int = 64,
    intermediate: int | None = None,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 128,
    vision_layers: int = 4,
    vision_hidden: int = 32,
    tile: int = 112,
    patch_size: int = 14,
    text_model: str = "qwen2",
    attn: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """A randomly initialised ``InternVLForConditionalGeneration`` (q/k-normed tower), in eval mode.

    ``(tile // patch_size) ** 2 / 4`` tokens per tile after the 0.5 pixel shuffle (16 by default); the image
    token is the last vocabulary id; features are the last layer's, CLS dropped.
    """
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig

    torch.manual_seed(seed)
    vision = InternVLVisionConfig(
        hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_hidden_layers=vision_layers,
        num_attention_heads=4, image_size=tile, patch_size=patch_size, use_qk_norm=True,
    )
    text = _text_config(text_model, layers=layers, hidden=hidden, intermediate=intermediate, heads=heads,
                        kv_heads=kv_heads, vocab=vocab)
    ratio = 0.5
    config = InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=vocab - 1, downsample_ratio=ratio,
        image_seq_length=int((tile // patch_size) ** 2 * ratio**2), vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return _instantiate(InternVLForConditionalGeneration, config, attn, dtype)


def _anyres_grid(config, image: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of the LLaVA-NeXT tile grid for an image of original size ``(h, w)``, base tile excluded."""
    from transformers.image_processing_utils import select_best_resolution

    size = config.vision_config.image_size
    best_h, best_w = select_best_resolution(list(image), config.image_grid_pinpoints)
    return best_h // size, best_w // size


def image_token_count(model, image) -> int:
    """Placeholder tokens for one image: LLaVA-NeXT ``image=(h, w)`` (base + unpadded grid + a newline per row),
    InternVL ``image=tiles`` (thumbnail included), LLaVA ``config.image_seq_length`` (``image`` ignored);
    LLaVA-OneVision ``image=(h, w)`` alone in its prompt (as LLaVA-NeXT, the unpadded grid downscaled beyond
    ``anyres_max_N`` tiles' worth).

    Example:
        >>> image_token_count(tiny_llava_next(layers=1, vision_layers=1), (56, 112))
        52
        >>> image_token_count(tiny_internvl(layers=1, vision_layers=1), 3)
        48
    """
    cfg = model.config
    if cfg.model_type == "internvl":
        return int(image) * cfg.image_seq_length
    if cfg.model_type not in ("llava_next", "llava_onevision"):
        return cfg.image_seq_length
    h, w = image
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    rows, cols = _anyres_grid(cfg, image)
    cur_h, cur_w = rows * g, cols * g
    if w / h > cur_w / cur_h:  # wider than the grid: padding rows are removed
        cur_h -= 2 * ((cur_h - int(round(h * (cur_w / w), 7))) // 2)
    else:  # taller: padding columns are removed
        cur_w -= 2 * ((cur_w - int(round(w * (cur_h / h), 7))) // 2)
    if cfg.model_type == "llava_onevision":  # anyres_max_N: downscaled if over N tiles' worth by more than 1.1x
        import math

        ratio = math.sqrt(cur_h * cur_w / (int(cfg.vision_aspect_ratio.removeprefix("anyres_max_")) * g * g))
        if ratio > 1.1:
            cur_h, cur_w = int(cur_h // ratio), int(cur_w // ratio)
    return g * g + cur_h * cur_w + cur_h


def tiled_inputs(
    model,
    *,
    images: list[list],
    text: int = 12,
    pad: list[int] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random left-padded prompts for LLaVA-NeXT (``images[b]`` = list of ``(h, w)``) or InternVL
    (``images[b]`` = list of tile counts), with text before, between and after the image runs.

    Returns ``input_ids``, ``attention_mask`` and ``pixel_values`` (LLaVA-NeXT: ``[num_images, max_tiles, 3, S, S]``
    zero-padded on the tile axis, plus ``image_sizes``; InternVL: flat ``[total_tiles, 3, S, S]``).
    """
    cfg = model.config
    token = cfg.image_token_id
    next_ = cfg.model_type == "llava_next"
    size = cfg.vision_config.image_size
    size = size if isinstance(size, int) else size[0]
    gen = torch.Generator().manual_seed(seed)
    pad = pad or [0] * len(images)
    seqs = []
    for sample in images:
        words = torch.randint(3, token, (text,), generator=gen)
        pieces, cut = [], torch.linspace(0, text, len(sample) + 2).long().tolist()
        for i, image in enumerate(sample):
            pieces += [words[cut[i] : cut[i + 1]], torch.full((image_token_count(model, image),), token)]
        pieces.append(words[cut[len(sample)] :])
        seqs.append(torch.cat(pieces))
    width = max(len(s) + p for s, p in zip(seqs, pad))
    zeros = [torch.zeros(width - len(s), dtype=torch.long) for s in seqs]
    ids = torch.stack([torch.cat([z, s]) for z, s in zip(zeros, seqs)])
    mask = torch.stack([torch.cat([z, torch.ones_like(s)]) for z, s in zip(zeros, seqs)])
    flat = [image for sample in images for image in sample]
    out = {"input_ids": ids, "attention_mask": mask}
    if next_:
        tiles = [1 + rows * cols for rows, cols in (_anyres_grid(cfg, image) for image in flat)]
        pixel = torch.zeros(len(flat), max(tiles, default=1), 3, size, size)
        for i, n in enumerate(tiles):
            pixel[i, :n] = torch.randn(n, 3, size, size, generator=gen)
        out["pixel_values"] = pixel.to(model.dtype)
        out["image_sizes"] = torch.tensor(flat, dtype=torch.long).view(-1, 2)
    else:
        out["pixel_values"] = torch.randn(sum(int(n) for n in flat), 3, size, size, generator=gen).to(model.dtype)
    return out


def llava_next_shaped(*, width: int = 256, vision_width: int = 256, layers: int = 32, vision_layers: int = 24,
                      attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0, head_dim: int = 32):
    """LLaVA-NeXT-7B's geometry at reduced width: 336px tiles / patch 14 (576 tokens each), its anyres pinpoints,
    a 24-layer tower read at layer -2, a 32-layer LLM (MLP ratio 11008/4096, head size ``head_dim``).

    Example:
        >>> model = llava_next_shaped(width=64, layers=1, vision_layers=1, vision_width=32)
        >>> image_token_count(model, (672, 672))
        2928
    """
    model = tiny_llava_next(
        tile=336, patch_size=14, vision_layers=vision_layers, vision_hidden=vision_width, layers=layers,
        hidden=width, intermediate=int(width * 11008 / 4096), heads=max(1, width // head_dim),
        kv_heads=max(1, width // head_dim), vocab=32064, attn=attn, dtype=dtype, seed=seed,
    )
    model.config.image_grid_pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    return model


def tiny_qwen2_5_vl(
    *,
    layers: int = 6,
    hidden: int = 96,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 128,
    vision_layers: int = 3,
    vision_hidden: int = 64,
    window_size: int = 56,
    attn: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    text_model: str = "qwen2",
):
    """A randomly initialised ``Qwen2_5_VLForConditionalGeneration``, in eval mode: a ``vision_layers``-deep
    ViT (14px patches, windows of 2x2 merged tokens with ``window_size=56``, the last block full attention),
    the 2x2 patch merger, and a Qwen2 LM with M-RoPE sections ``[4, 4, 4]`` (head_dim 24). The image token
    is the last vocabulary id, the video token the one before (``text_model`` is ignored: the LM is Qwen2).

    Example:
        >>> m = tiny_qwen2_5_vl(layers=1, vision_layers=1)
        >>> inputs = qwen_inputs(m, images=[[(8, 12)]])
        >>> int((inputs["input_ids"] == m.config.image_token_id).sum())
        24
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    text = {"hidden_size": hidden, "intermediate_size": hidden * 2, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
            "max_position_embeddings": 8192, "pad_token_id": 0,
            "bos_token_id": None, "eos_token_id": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 4, 4]}}
    vision = {"depth": vision_layers, "hidden_size": vision_hidden, "intermediate_size": vision_hidden * 2,
              "num_heads": 4, "out_hidden_size": hidden, "patch_size": 14, "spatial_merge_size": 2,
              "temporal_patch_size": 2, "window_size": window_size, "fullatt_block_indexes": [vision_layers - 1]}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=vocab - 1,
                              video_token_id=vocab - 2, vision_start_token_id=1, vision_end_token_id=2)
    return _instantiate(Qwen2_5_VLForConditionalGeneration, config, attn, dtype)


def tiny_qwen3_vl(
    *,
    layers: int = 6,
    hidden: int = 96,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 128,
    vision_layers: int = 3,
    vision_hidden: int = 64,
    deepstack: tuple[int, ...] = (0, 1, 2),
    moe: bool = False,
    attn: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    text_model: str = "qwen3",
):
    """A randomly initialised ``Qwen3VLForConditionalGeneration`` (``moe``: ``Qwen3VLMoeForConditionalGeneration``,
    4 experts, 2 per token), in eval mode: a ``vision_layers``-deep ViT (16px patches, full attention), the 2x2
    merger, DeepStack features from vision blocks ``deepstack`` (added after the LLM's first ``len(deepstack)``
    layers), and a Qwen3 LM (q/k norms) with interleaved M-RoPE sections ``[4, 4, 4]`` (head_dim 24). The image
    token is the last vocabulary id, the video token the one before (``text_model`` is ignored).

    Example:
        >>> m = tiny_qwen3_vl(layers=2, vision_layers=1, deepstack=(0,))
        >>> inputs = qwen_inputs(m, images=[[(8, 12)]])
        >>> m(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]
        True
    """
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    text = {"hidden_size": hidden, "intermediate_size": hidden * 2, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
            "vocab_size": vocab, "max_position_embeddings": 8192, "pad_token_id": 0,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 4, 4],
                                "mrope_interleaved": True}}
    vision = {"depth": vision_layers, "hidden_size": vision_hidden, "intermediate_size": vision_hidden * 2,
              "num_heads": 4, "out_hidden_size": hidden, "patch_size": 16, "spatial_merge_size": 2,
              "temporal_patch_size": 2, "num_position_embeddings": 256, "deepstack_visual_indexes": list(deepstack)}
    ids = {"image_token_id": vocab - 1, "video_token_id": vocab - 2, "vision_start_token_id": 1,
           "vision_end_token_id": 2}
    if moe:
        from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden, decoder_sparse_step=1)
        config = Qwen3VLMoeConfig(text_config=text, vision_config=vision, **ids)
        return _instantiate(Qwen3VLMoeForConditionalGeneration, config, attn, dtype)
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    return _instantiate(Qwen3VLForConditionalGeneration, config, attn, dtype)


def qwen_inputs(
    model,
    *,
    images: list[list[tuple[int, int]]],
    text: int = 12,
    pad: list[int] | None = None,
    seed: int = 0,
    videos: list[list[tuple[int, int, int]]] | None = None,
) -> dict[str, torch.Tensor]:
    """Random left-padded Qwen2.5-VL or Qwen3-VL prompts; ``images[b]`` lists each image's ``(rows, cols)`` of patches
    (even numbers: ``rows * cols / 4`` tokens). Returns ``input_ids``, ``attention_mask``, ``pixel_values``
    (``[patches, 3 * 2 * 14 * 14]``), ``image_grid_thw`` and ``mm_token_type_ids``, as the processor does.
    ``videos[b]`` lists videos ``(frames, rows, cols)`` (even frames: ``frames/2 * rows * cols / 4``
    tokens) placed after sample ``b``'s images; then ``pixel_values_videos`` and ``video_grid_thw`` too. On
    Qwen3-VL a video is one run of placeholders per temporal group, each after two (timestamp) text tokens.
    """
    cfg = model.config
    token, unit = cfg.image_token_id, cfg.vision_config.spatial_merge_size ** 2
    tp = cfg.vision_config.temporal_patch_size
    words_up_to = min(token, cfg.video_token_id)
    split = cfg.model_type.startswith("qwen3_vl")
    gen = torch.Generator().manual_seed(seed)
    pad = pad or [0] * len(images)
    videos = videos or [[] for _ in images]
    seqs = []
    for sample, clips in zip(images, videos, strict=True):
        words = torch.randint(3, words_up_to, (text,), generator=gen)
        pieces, cut = [], torch.linspace(0, text, len(sample) + 2).long().tolist()
        for i, (h, w) in enumerate(sample):
            pieces += [words[cut[i]: cut[i + 1]], torch.full((h * w // unit,), token)]
        for t, h, w in clips:
            if split:  # Qwen3-VL: one run per temporal group, each after its timestamp text (two tokens here)
                for _ in range(t // tp):
                    pieces += [torch.randint(3, words_up_to, (2,), generator=gen),
                               torch.full((h * w // unit,), cfg.video_token_id)]
            else:
                pieces.append(torch.full((t // tp * h * w // unit,), cfg.video_token_id))
        pieces.append(words[cut[len(sample)]:])
        seqs.append(torch.cat(pieces))
    width = max(len(s) + p for s, p in zip(seqs, pad))
    zeros = [torch.zeros(width - len(s), dtype=torch.long) for s in seqs]
    ids = torch.stack([torch.cat([z, s]) for z, s in zip(zeros, seqs)])
    mask = torch.stack([torch.cat([z, torch.ones_like(s)]) for z, s in zip(zeros, seqs)])
    flat = [image for sample in images for image in sample]
    v = cfg.vision_config
    dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
    pixel = torch.randn(sum(h * w for h, w in flat), dim, generator=gen).to(model.dtype)
    grid = torch.tensor([[1, h, w] for h, w in flat], dtype=torch.long).view(-1, 3)
    out = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel, "image_grid_thw": grid,
           "mm_token_type_ids": (ids == token).long() + 2 * (ids == cfg.video_token_id).long()}
    clips = [clip for sample in videos for clip in sample]
    if clips:
        out["pixel_values_videos"] = torch.randn(sum(t // tp * h * w for t, h, w in clips), dim,
                                                 generator=gen).to(model.dtype)
        out["video_grid_thw"] = torch.tensor([[t // tp, h, w] for t, h, w in clips], dtype=torch.long)
    return out


def _split_qwen(inputs: dict) -> list[dict]:
    """:func:`split_inputs` for Qwen2.5-VL's flat patches and per-image grids."""
    grid = inputs["image_grid_thw"]
    images_of = [0] * inputs["input_ids"].shape[0]
    for b, _ in runs(inputs["mm_token_type_ids"] == 1):
        images_of[b] += 1
    patches = grid.prod(-1).tolist()
    out, image, start = [], 0, 0
    for b, n in enumerate(images_of):
        real = inputs["attention_mask"][b].bool()
        size = sum(patches[image: image + n])
        out.append({"input_ids": inputs["input_ids"][b: b + 1, real],
                    "attention_mask": inputs["attention_mask"][b: b + 1, real],
                    "pixel_values": inputs["pixel_values"][start: start + size],
                    "image_grid_thw": grid[image: image + n],
                    "mm_token_type_ids": inputs["mm_token_type_ids"][b: b + 1, real]})
        image, start = image + n, start + size
    if "video_grid_thw" in inputs:  # each sample's videos, one run of video rows each
        vgrid, video, start = inputs["video_grid_thw"], 0, 0
        counts = [0] * len(out)
        sizes = (vgrid.prod(-1) // 4).tolist()  # tokens of each video, after the 2x2 merger
        filled = 0  # tokens of the current video seen so far (Qwen3-VL: one run per temporal group)
        for b, r in runs(inputs["mm_token_type_ids"] == 2):
            filled += r.numel()
            if filled == sizes[sum(counts)]:
                counts[b], filled = counts[b] + 1, 0
        for sample, n in zip(out, counts):
            size = int(vgrid[video: video + n].prod(-1).sum())
            if n:
                sample["pixel_values_videos"] = inputs["pixel_values_videos"][start: start + size]
                sample["video_grid_thw"] = vgrid[video: video + n]
            video, start = video + n, start + size
    return out


def _sections(full: list[int], head_dim: int) -> list[int]:
    """M-RoPE sections ``full`` (for head_dim 128) scaled to ``head_dim``, summing to ``head_dim / 2``."""
    out = [round(x * head_dim / 128) for x in full]
    out[0] += head_dim // 2 - sum(out)
    return out


def qwen2_5_vl_shaped(*, attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0, width: int = 3584,
                      vision_width: int = 1280, layers: int = 28, head_dim: int = 128):
    """Qwen2.5-VL-7B-Instruct's geometry with random weights (build it under ``torch.device("meta")`` for a
    plan): a 32-block ViT of width 1280 (windows of 112px, full attention in blocks 7, 15, 23, 31), the 2x2
    merger, a 28-layer LM of width 3584 (28 heads, 4 KV heads, MLP 18944, M-RoPE sections [16, 24, 24]).
    ``width``, ``vision_width``, ``layers``, ``head_dim``: a reduced shape (benchmarks), ratios kept.

    Example:
        >>> with torch.device("meta"):
        ...     model = qwen2_5_vl_shaped()
        >>> model.config.text_config.num_hidden_layers, model.config.vision_config.depth
        (28, 32)
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    heads = max(1, width // head_dim)
    text = {"hidden_size": width, "intermediate_size": round(width * 18944 / 3584), "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 7), "vocab_size": 152064,
            "max_position_embeddings": 128000,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                "mrope_section": _sections([16, 24, 24], head_dim)}}
    vision = {"depth": 32, "hidden_size": vision_width, "intermediate_size": round(vision_width * 3420 / 1280),
              "num_heads": 16, "out_hidden_size": width,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
              "fullatt_block_indexes": [7, 15, 23, 31]}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                              vision_start_token_id=151652, vision_end_token_id=151653)
    return _instantiate(Qwen2_5_VLForConditionalGeneration, config, attn, dtype)


def qwen3_vl_shaped(*, attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0, width: int = 4096,
                    vision_width: int = 1152, layers: int = 36, head_dim: int = 128):
    """Qwen3-VL-8B-Instruct's geometry with random weights (build it under ``torch.device("meta")`` for a plan): a
    27-block ViT of width 1152 (16px patches, full attention), the 2x2 merger, DeepStack from blocks 8, 16 and 24
    into the LM's first 3 layers, a 36-layer LM of width 4096 (32 heads, 8 KV heads, head_dim 128, MLP 12288,
    interleaved M-RoPE sections [24, 20, 20], rope_theta 5e6). Sizes: the vision config's defaults in
    transformers' ``configuration_qwen3_vl.py`` (the 8B's tower) and the 8B's published text config. ``width``,
    ``vision_width``, ``layers``, ``head_dim``: a reduced shape (benchmarks), ratios kept.

    Example:
        >>> with torch.device("meta"):
        ...     model = qwen3_vl_shaped()
        >>> model.config.text_config.num_hidden_layers, model.config.vision_config.deepstack_visual_indexes
        (36, [8, 16, 24])
    """
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    heads = max(1, width // head_dim)
    text = {"hidden_size": width, "intermediate_size": width * 3, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 4), "head_dim": head_dim,
            "vocab_size": 151936, "max_position_embeddings": 262144,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0,
                                "mrope_section": _sections([24, 20, 20], head_dim), "mrope_interleaved": True}}
    vision = {"depth": 27, "hidden_size": vision_width, "intermediate_size": round(vision_width * 4304 / 1152),
              "num_heads": 16, "out_hidden_size": width,
              "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304,
              "deepstack_visual_indexes": [8, 16, 24]}
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                           vision_start_token_id=151652, vision_end_token_id=151653)
    return _instantiate(Qwen3VLForConditionalGeneration, config, attn, dtype)


def tiny_llava_onevision(
    *,
    layers: int = 6,
    hidden: int = 64,
    intermediate: int | None = None,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 128,
    vision_layers: int = 3,
    vision_hidden: int = 32,
    vision_heads: int = 4,
    tile: int = 70,
    patch_size: int = 14,
    aspect: str = "anyres_max_2",
    text_model: str = "qwen2",
    attn: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """A randomly initialised ``LlavaOnevisionForConditionalGeneration`` (SigLIP tower without [CLS], anyres
    tiles capped by ``aspect``, video frames pooled 2x2), in eval mode.

    Tiles are ``tile`` px (5x5 patches by default, an odd grid: a video frame pools to 3x3); the pinpoints
    ``[[tile, 2 tile], [2 tile, tile], [2 tile, 2 tile]]`` give 1x2, 2x1 and 2x2 grids, and ``anyres_max_2``
    downscales the 2x2 grid's 10x10 tokens to 7x7 (the model's bilinear downscaling). The image token is the
    last vocabulary id, the video token the one before; features are the last layer's, every patch.

    Example:
        >>> m = tiny_llava_onevision(layers=1, vision_layers=1)
        >>> [image_token_count(m, size) for size in [(70, 140), (140, 140)]], onevision_video_tokens(m, 4)
        ([80, 81], 37)
    """
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(seed)
    vision = SiglipVisionConfig(
        hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads, image_size=tile, patch_size=patch_size, vision_use_head=False,
    )
    text = _text_config(text_model, layers=layers, hidden=hidden, intermediate=intermediate, heads=heads,
                        kv_heads=kv_heads, vocab=vocab)
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=vocab - 1, video_token_index=vocab - 2,
        image_grid_pinpoints=[[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]],
        vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio=aspect,
    )
    return _instantiate(LlavaOnevisionForConditionalGeneration, config, attn, dtype)


def onevision_video_tokens(model, frames: int) -> int:
    """Placeholder tokens of a LLaVA-OneVision video: each frame's grid pooled 2x2 (rounded up), one newline."""
    g = model.config.vision_config.image_size // model.config.vision_config.patch_size
    return frames * (-(-g // 2)) ** 2 + 1


def onevision_inputs(
    model,
    *,
    images: list[list[tuple[int, int]]],
    videos: list[list[int]] | None = None,
    text: int = 12,
    pad: list[int] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random left-padded LLaVA-OneVision prompts, as its processor makes them: ``images[b]`` lists sample
    ``b``'s images ``(h, w)`` (one image: anyres tiles; several: each its base tile and a newline, as
    ``batch_num_images`` tells the model); ``videos[b]`` the frame counts of its videos, placed after its
    images (every video of a batch has as many frames). Returns ``input_ids``, ``attention_mask``,
    ``pixel_values`` (``[images, max tiles, 3, S, S]``, zero-padded), ``image_sizes``, ``batch_num_images``,
    and with videos ``pixel_values_videos`` (``[videos, frames, 3, S, S]``).

    Example:
        >>> m = tiny_llava_onevision(layers=1, vision_layers=1)
        >>> inputs = onevision_inputs(m, images=[[(70, 140)], [(70, 70), (70, 70)]], videos=[[2], []])
        >>> inputs["pixel_values"].shape[:2], inputs["pixel_values_videos"].shape[:2]
        (torch.Size([3, 3]), torch.Size([1, 2]))
    """
    cfg = model.config
    token, video = cfg.image_token_id, cfg.video_token_id
    size = cfg.vision_config.image_size
    gen = torch.Generator().manual_seed(seed)
    pad = pad or [0] * len(images)
    videos = videos or [[] for _ in images]
    g = size // cfg.vision_config.patch_size
    seqs = []
    for sample, clips in zip(images, videos, strict=True):
        words = torch.randint(3, min(token, video), (text,), generator=gen)
        pieces, cut = [], torch.linspace(0, text, len(sample) + 2).long().tolist()
        for i, image in enumerate(sample):
            count = g * g + 1 if len(sample) > 1 else image_token_count(model, image)
            pieces += [words[cut[i]: cut[i + 1]], torch.full((count,), token)]
        pieces += [torch.full((onevision_video_tokens(model, frames),), video) for frames in clips]
        pieces.append(words[cut[len(sample)]:])
        seqs.append(torch.cat(pieces))
    width = max(len(s) + p for s, p in zip(seqs, pad))
    zeros = [torch.zeros(width - len(s), dtype=torch.long) for s in seqs]
    out = {"input_ids": torch.stack([torch.cat([z, s]) for z, s in zip(zeros, seqs)]),
           "attention_mask": torch.stack([torch.cat([z, torch.ones_like(s)]) for z, s in zip(zeros, seqs)])}
    flat = [(image, len(sample) > 1) for sample in images for image in sample]
    tiles = [1 if single else 1 + rows * cols
             for (image, single) in flat for rows, cols in [_anyres_grid(cfg, image)]]
    pixel = torch.zeros(len(flat), max(tiles, default=1), 3, size, size)
    for i, n in enumerate(tiles):
        pixel[i, :n] = torch.randn(n, 3, size, size, generator=gen)
    out["pixel_values"] = pixel.to(model.dtype)
    out["image_sizes"] = torch.tensor([image for image, _ in flat], dtype=torch.long).view(-1, 2)
    out["batch_num_images"] = torch.tensor([len(sample) for sample in images])
    clips = [frames for sample in videos for frames in sample]
    if clips:
        if len(set(clips)) > 1:
            raise ValueError(f"every video of a batch needs as many frames (one tensor), got {clips}")
        out["pixel_values_videos"] = torch.randn(len(clips), clips[0], 3, size, size, generator=gen).to(model.dtype)
    return out


def _split_onevision(model, inputs: dict) -> list[dict]:
    """:func:`split_inputs` for LLaVA-OneVision: each sample's images (``batch_num_images``) and videos."""
    videos = [0] * inputs["input_ids"].shape[0]
    for b, _ in runs(inputs["input_ids"] == model.config.video_token_id):
        videos[b] += 1
    out, image, video = [], 0, 0
    for b, n in enumerate(inputs["batch_num_images"].tolist()):
        real = inputs["attention_mask"][b].bool()
        sample = {"input_ids": inputs["input_ids"][b: b + 1, real],
                  "attention_mask": inputs["attention_mask"][b: b + 1, real],
                  "pixel_values": inputs["pixel_values"][image: image + n],
                  "image_sizes": inputs["image_sizes"][image: image + n],
                  "batch_num_images": inputs["batch_num_images"][b: b + 1]}
        if videos[b]:
            sample["pixel_values_videos"] = inputs["pixel_values_videos"][video: video + videos[b]]
        image, video = image + n, video + videos[b]
        out.append(sample)
    return out


def llava_onevision_shaped(*, width: int = 3584, vision_width: int = 1152, layers: int = 28, vision_layers: int = 26,
                           head_dim: int = 128, vision_heads: int = 16, attn: str = "sdpa",
                           dtype: torch.dtype = torch.float32, seed: int = 0):
    """LLaVA-OneVision-Qwen2-7B's geometry (``llava-hf/llava-onevision-qwen2-7b-ov-hf``; transformers'
    ``LlavaOnevisionConfig`` defaults): SigLIP-so400m at 384px / patch 14 (27x27 = 729 tokens per tile, no
    [CLS]), 26 layers read at the last, width 1152 (MLP 4304, 16 heads); anyres pinpoints 384..2304 in steps of
    384, ``anyres_max_9``; Qwen2-7B (28 layers, width 3584, 28 heads of 128, 4 KV heads, MLP 18944, vocabulary
    152064). ``width``/``vision_width`` reduce it for benchmarks (heads of ``head_dim``, the KV heads a
    seventh, MLP ratios kept). Build it under ``torch.device("meta")`` for a plan.

    Example:
        >>> with torch.device("meta"):
        ...     model = llava_onevision_shaped()
        >>> image_token_count(model, (2304, 2304)), onevision_video_tokens(model, 32)
        (7371, 6273)
    """
    model = tiny_llava_onevision(
        layers=layers, hidden=width, intermediate=int(width * 18944 / 3584), heads=max(1, width // head_dim),
        kv_heads=max(1, width // head_dim // 7), vocab=152064, vision_layers=vision_layers,
        vision_hidden=vision_width, vision_heads=vision_heads, tile=384, patch_size=14, aspect="anyres_max_9",
        attn=attn, dtype=dtype, seed=seed,
    )
    model.config.vision_config.intermediate_size = int(vision_width * 4304 / 1152)
    model.config.image_grid_pinpoints = [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)]
    return model


LAYOUTS["llava_onevision"] = [(70, 140), (140, 140), (140, 70)]
