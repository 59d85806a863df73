"""Load the shipped toy model and score it through the public ``generate`` interface.

Example:
    >>> from vtc.eval import toy
    >>> model, processor = toy.load()                      # doctest: +SKIP
    >>> toy.evaluate(model, processor, toy.generate(50, seed=7))["overall"] > 0.9  # doctest: +SKIP
    True
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

from .scenes import Record, asked_tokens

MODEL_PATH: Path = Path(__file__).resolve().parent / "model"
QWEN_MODEL_PATH: Path = Path(__file__).resolve().parent / "model-qwen"
# The toy of each family and the script that trains it.
MODEL_PATHS: dict[str, Path] = {"llava": MODEL_PATH, "qwen2_5_vl": QWEN_MODEL_PATH}
TRAIN_SCRIPTS: dict[str, str] = {"llava": "scripts/train_toy.py", "qwen2_5_vl": "scripts/train_toy_qwen.py"}


def load(path: str | Path | None = None, family: str = "llava") -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load ``(model, processor)`` offline (the toy of ``family``: ``llava`` or ``qwen2_5_vl``, unless
    ``path`` is given); the model is float32 in eval mode.

    Example:
        >>> model, processor = load()                       # doctest: +SKIP
        >>> model.config.image_seq_length                    # doctest: +SKIP
        144
        >>> load(family="qwen2_5_vl")[0].config.model_type   # doctest: +SKIP
        'qwen2_5_vl'
    """
    if family not in MODEL_PATHS:
        raise ValueError(f"no toy model of family {family!r}; the toys are {', '.join(MODEL_PATHS)}")
    path = Path(path) if path is not None else MODEL_PATHS[family]
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no trained toy model at {path}; run {TRAIN_SCRIPTS[family]} first")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return model.eval(), processor


def prompt(processor: LlavaProcessor, question: str) -> str:
    """The chat prompt for one image and one question (the processor's template: LLaVA-1.5's, or Qwen's).

    Example:
        >>> from vtc.eval.toy.build import build_processor
        >>> prompt(build_processor(), "what shape is the red object?")
        'USER: <image>\\nwhat shape is the red object? ASSISTANT:'
    """
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def _first_word(text: str) -> str:
    words = text.strip().lower().replace("?", " ").replace(".", " ").split()
    return words[0] if words else ""


@torch.no_grad()
def answer(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    records: Sequence[Record],
    batch_size: int = 16,
    max_new_tokens: int = 3,
) -> list[str]:
    """Greedy one-word answers for ``records``, batched with left padding, via ``model.generate``.

    Example:
        >>> answer(model, processor, generate(4, seed=3))   # doctest: +SKIP
        ['red', 'square', 'no', 'blue']
    """
    tokenizer = processor.tokenizer
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    preds: list[str] = []
    try:
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            inputs = processor(
                images=[r.image for r in batch],
                text=[prompt(processor, r.question) for r in batch],
                padding=True,
                return_tensors="pt",
            ).to(device)
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = out[:, inputs["input_ids"].shape[1] :]
            preds.extend(_first_word(processor.decode(t, skip_special_tokens=True)) for t in new_tokens)
    finally:
        tokenizer.padding_side = old_side
    return preds


def score(records: Sequence[Record], predictions: Sequence[str]) -> dict:
    """Exact-match accuracy: ``{"overall": float, "per_kind": {kind: float}, "n": int}``.

    Example:
        >>> from vtc.eval.toy import generate
        >>> recs = generate(3, seed=0)
        >>> score(recs, [r.answer for r in recs])["overall"]
        1.0
    """
    hits: dict[str, list[bool]] = defaultdict(list)
    for rec, pred in zip(records, predictions, strict=True):
        hits[rec.kind].append(pred == rec.answer)
    every = [h for v in hits.values() for h in v]
    return {
        "overall": sum(every) / max(1, len(every)),
        "per_kind": {k: sum(v) / len(v) for k, v in hits.items()},
        "n": len(every),
    }


def evaluate(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    records: Sequence[Record],
    batch_size: int = 16,
) -> dict:
    """Answer ``records`` with ``generate`` and return overall and per-kind exact match.

    Example:
        >>> evaluate(model, processor, generate(500, seed=31337))  # doctest: +SKIP
        {'overall': 0.97, 'per_kind': {'color': 0.98, 'shape': 0.97, 'presence': 0.96}, 'n': 500}
    """
    return score(records, answer(model, processor, records, batch_size=batch_size))


def answers_without_the_object(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, records: Sequence[Record], batch_size: int = 16
) -> dict:
    """With a vtc method installed: exact match on the records whose asked objects kept a token to the LLM's
    last stage, and on those where no kept token shows any pixel of them (``asked_tokens`` at any cover). A
    toy that answers the second group well above chance reads the objects from other tokens (a tower that
    spread them over the background), which no pruning benchmark should reward.

    Example:
        >>> with vtc.compressed(model, "random", budget=1 / 9):                  # doctest: +SKIP
        ...     answers_without_the_object(model, processor, generate(480, seed=31340))
        {'kept': {'overall': 0.90, 'n': 271}, 'dropped': {'overall': 0.37, 'n': 49}}
    """
    import vtc  # the toy's harness runs without vtc installed on the model otherwise

    groups: dict[str, list[bool]] = {"kept": [], "dropped": []}
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        predictions = answer(model, processor, batch, batch_size=batch_size)
        kept = list(vtc.stats(model).kept.values())[-1]  # the last stage's kept indices, per image
        for rec, pred, idx in zip(batch, predictions, kept, strict=True):
            asked = torch.as_tensor(asked_tokens(rec, min_cover=1e-9))  # any pixel of the object
            groups["kept" if bool(asked[idx.cpu()].any()) else "dropped"].append(pred == rec.answer)
    return {name: {"overall": sum(h) / max(1, len(h)), "n": len(h)} for name, h in groups.items()}
