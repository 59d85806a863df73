"""Build the toy model's tokenizer, processor and configuration locally (no hub access).

Example:
    >>> from vtc.eval.toy.build import build_processor
    >>> proc = build_processor()
    >>> proc.apply_chat_template(
    ...     [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the circle?"}]}],
    ...     add_generation_prompt=True,
    ... )
    'USER: <image>\\nwhat color is the circle? ASSISTANT:'
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from .scenes import COLOR_NAMES, IMAGE_SIZE, NUMBER_WORDS, PATCH_SIZE, SHAPES, TEMPLATES

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
ROLE_WORDS: tuple[str, ...] = ("USER", "ASSISTANT", ":", "?")
ANSWER_WORDS: tuple[str, ...] = (*COLOR_NAMES, *SHAPES, "yes", "no", *NUMBER_WORDS.values())
NOTHING_WORD = "nothing"  # what a background image token is aligned with in stage 2

# LLaVA-1.5 style: "USER: <image>\n{question} ASSISTANT: {answer}</s>USER: ..."
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- 'USER: ' -}}"
    "{%- for item in parts if item['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{%- for item in parts if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}"
    "{{- ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'ASSISTANT: ' -}}"
    "{%- for item in parts if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}"
    "{{- '</s>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def vocabulary() -> list[str]:
    """All tokens, specials first (``<pad>`` = 0).

    Example:
        >>> vocabulary()[:5]
        ['<pad>', '<s>', '</s>', '<unk>', '<image>']
    """
    words: list[str] = list(SPECIAL_TOKENS) + list(ROLE_WORDS)
    template_words = " ".join(TEMPLATES.values()).replace("?", " ").split()
    for w in [*template_words, *ANSWER_WORDS, NOTHING_WORD]:
        if "{" not in w and w not in words:
            words.append(w)
    return words


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer that prepends ``<s>`` and knows ``<image>``.

    Example:
        >>> tok = build_tokenizer()
        >>> tok.convert_ids_to_tokens(tok("USER: what color is the circle?")["input_ids"])
        ['<s>', 'USER', ':', 'what', 'color', 'is', 'the', 'circle', '?']
    """
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor() -> LlavaProcessor:
    """The LLaVA processor: CLIP preprocessing at 168 px plus the word-level tokenizer.

    ``<image>`` expands to (168 / 14)^2 + 1 - 1 = 144 placeholder tokens (CLS dropped).

    Example:
        >>> proc = build_processor()
        >>> from PIL import Image
        >>> enc = proc(images=Image.new("RGB", (168, 168)), text="USER: <image>\\nhi", return_tensors="pt")
        >>> int((enc["input_ids"] == proc.image_token_id).sum())
        144
    """
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(
    vision_layers: int = 5,
    vision_width: int = 128,
    text_layers: int = 8,
    text_width: int = 128,
) -> LlavaConfig:
    """The LLaVA-1.5 style configuration of the toy model (tied word embeddings).

    Example:
        >>> cfg = build_config()
        >>> cfg.vision_feature_layer, cfg.vision_feature_select_strategy, cfg.image_seq_length
        (-2, 'default', 144)
    """
    vocab = vocabulary()
    vision = CLIPVisionConfig(
        hidden_size=vision_width,
        intermediate_size=4 * vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_width // 32),
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=vision_width,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=text_width,
        intermediate_size=3 * text_width,
        num_hidden_layers=text_layers,
        num_attention_heads=max(1, text_width // 32),
        num_key_value_heads=max(1, text_width // 32),
        max_position_embeddings=1024,
        # Large base: more rotary dimensions stay nearly position-free over the ~250-token
        # distance between an answer and the image tokens, so content look-ups are learnable.
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        pad_token_id=vocab.index("<pad>"),
        bos_token_id=vocab.index("<s>"),
        eos_token_id=vocab.index("</s>"),
        tie_word_embeddings=True,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocab.index("<image>"),
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
