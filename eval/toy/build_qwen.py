"""Build the Qwen2.5-VL-format toy's tokenizer, processor and configuration locally (no hub access).

The toy's scenes (168 or 224 px) are seen at half the real family's pixel scale: 7 px patches,
2x2 merged into one LLM token of 14 px (the LLaVA toy's patch), windows of 8x8 patches (56 px,
4x4 tokens) and full attention in the tower's last block of each half, like Qwen2.5-VL's 14 px
patches, 112 px windows and full attention every 8th block. A 168 px scene is 144 tokens (the
LLaVA toy's count), a 224 px scene 256.

Example:
    >>> from vtc.eval.toy.build_qwen import build_processor
    >>> proc = build_processor()
    >>> print(proc.apply_chat_template(
    ...     [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the circle?"}]}],
    ...     add_generation_prompt=True,
    ... ))
    <|im_start|>user
    <|vision_start|><|image_pad|><|vision_end|>what color is the circle?<|im_end|>
    <|im_start|>assistant
    <BLANKLINE>
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessorPil,
    Qwen2VLVideoProcessor,
)

from . import build
from .scenes import PATCH_SIZE

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>", "<unk>",
)
ROLE_WORDS: tuple[str, ...] = ("user", "assistant", "?")
PATCH = PATCH_SIZE // 2  # 7 px patches; 2x2 of them make one 14 px token
MERGE = 2
SIZES: tuple[int, ...] = (168, 224)  # square scenes: 144 or 256 tokens
# Where the LLaVA toy's training code says <s>, </s>, <pad>, <image>: the Qwen format's tokens.
ALIASES: dict[str, str] = {"</s>": "<|im_end|>", "<pad>": "<|endoftext|>", "<image>": "<|image_pad|>"}

# Qwen2.5-VL's chat layout (no system turn): "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>
# {question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n".
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- for item in parts if item['type'] == 'image' -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}{%- endfor -%}"
    "{%- for item in parts if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def vocabulary() -> list[str]:
    """All tokens, specials first (``<|endoftext|>`` = 0, the padding), then the LLaVA toy's words.

    Example:
        >>> vocabulary()[:3], "circle" in vocabulary()
        (['<|endoftext|>', '<|im_start|>', '<|im_end|>'], True)
    """
    skip = set(build.SPECIAL_TOKENS) | set(build.ROLE_WORDS)
    return [*SPECIAL_TOKENS, *ROLE_WORDS, *(w for w in build.vocabulary() if w not in skip)]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer with Qwen's special tokens (no BOS, as Qwen's tokenizer).

    Example:
        >>> tok = build_tokenizer()
        >>> tok.convert_ids_to_tokens(tok("<|im_start|>user\\nwhat color is the circle?")["input_ids"])
        ['<|im_start|>', 'user', 'what', 'color', 'is', 'the', 'circle', '?']
    """
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor() -> Qwen2_5_VLProcessor:
    """The Qwen2.5-VL processor: 7 px patches merged 2x2, images kept at their size (168 or 224 px are
    multiples of 14), CLIP normalization, the word-level tokenizer.

    Example:
        >>> proc = build_processor()
        >>> from PIL import Image
        >>> enc = proc(images=Image.new("RGB", (224, 224)), text="<|vision_start|><|image_pad|><|vision_end|>",
        ...            return_tensors="pt")
        >>> int((enc["input_ids"] == proc.image_token_id).sum()), enc["image_grid_thw"].tolist()
        (256, [[1, 32, 32]])
    """
    factor = PATCH * MERGE
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
        min_pixels=factor * factor * 4, max_pixels=factor * factor * 1024,
    )
    # The processor class requires a video processor; the toy has no video, it only keeps the geometry.
    video_processor = Qwen2VLVideoProcessor(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2)
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=build_tokenizer(),
                               video_processor=video_processor, chat_template=CHAT_TEMPLATE)


def build_config(
    vision_layers: int = 4,
    vision_width: int = 128,
    text_layers: int = 8,
    text_width: int = 128,
    vision_heads: int | None = None,
) -> Qwen2_5_VLConfig:
    """The Qwen2.5-VL-style configuration of the toy (tied word embeddings, M-RoPE sections 1/4, 3/8, 3/8
    of the rotary half as the 7B's [16, 24, 24]).

    Example:
        >>> cfg = build_config()
        >>> cfg.vision_config.patch_size, cfg.vision_config.window_size, cfg.vision_config.fullatt_block_indexes
        (7, 56, [1, 3])
    """
    vocab = vocabulary()
    heads = max(1, text_width // 32)
    half = text_width // heads // 2
    section = [half // 4, half * 3 // 8, half - half // 4 - half * 3 // 8]
    text = {
        "vocab_size": len(vocab), "hidden_size": text_width, "intermediate_size": 3 * text_width,
        "num_hidden_layers": text_layers, "num_attention_heads": heads, "num_key_value_heads": heads,
        "max_position_embeddings": 1024, "pad_token_id": vocab.index("<|endoftext|>"),
        "eos_token_id": vocab.index("<|im_end|>"), "bos_token_id": None, "tie_word_embeddings": True,
        # A large base, as the LLaVA toy: content look-ups over the image span stay learnable.
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
    }
    vision = {
        "depth": vision_layers, "hidden_size": vision_width, "intermediate_size": 4 * vision_width,
        "num_heads": vision_heads or max(1, vision_width // 32), "out_hidden_size": text_width, "patch_size": PATCH,
        "spatial_merge_size": MERGE, "temporal_patch_size": 2, "window_size": PATCH * MERGE * 4,
        "fullatt_block_indexes": [vision_layers // 2 - 1, vision_layers - 1],
    }
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=vocab.index("<|image_pad|>"),
        video_token_id=vocab.index("<|video_pad|>"), vision_start_token_id=vocab.index("<|vision_start|>"),
        vision_end_token_id=vocab.index("<|vision_end|>"), tie_word_embeddings=True,
    )
