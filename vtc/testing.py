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
    from transformers import AutoConfig, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_hidden_layers=vision_layers,
        num_attention_heads=4, image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden,
    )
    text = AutoConfig.for_model(
        text_model, hidden_size=hidden, intermediate_size=intermediate or hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
        max_position_embeddings=8192, pad_token_id=0,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=vocab - 1,
        image_seq_length=(image_size // patch_size) ** 2,
    )
    config._attn_implementation = attn
    model = LlavaForConditionalGeneration(config).to(dtype).eval()
    model.set_attn_implementation(attn)
    return model


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
    """
    cfg = model.config
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
                   attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0):
    """LLaVA-1.5-7B's geometry at reduced width: 336px / patch 14 = 576 tokens per image,
    a 24-layer tower read at layer -2, a 32-layer LLM (MLP ratio 11008/4096, head size 32).

    Example:
        >>> llava15_shaped(width=64, layers=4, vision_layers=3, vision_width=32).config.image_seq_length
        576
    """
    return tiny_llava(
        image_size=336, patch_size=14, vision_layers=vision_layers, vision_hidden=vision_width, layers=layers,
        hidden=width, intermediate=int(width * 11008 / 4096), heads=max(1, width // 32), kv_heads=max(1, width // 32),
        vocab=32064, attn=attn, dtype=dtype, seed=seed,
    )
