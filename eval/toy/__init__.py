"""Toy VQA benchmark and a small trained LLaVA-format model for CPU accuracy-vs-budget curves.

Example:
    >>> from vtc.eval import toy
    >>> recs = toy.generate(3, seed=0)
    >>> [r.kind for r in recs]
    ['color', 'shape', 'presence']
    >>> model, processor = toy.load()                         # doctest: +SKIP
    >>> toy.evaluate(model, processor, toy.generate(500, seed=31337))  # doctest: +SKIP
"""

from __future__ import annotations

from .harness import (
    MODEL_PATH,
    MODEL_PATHS,
    QWEN_MODEL_PATH,
    answer,
    answers_without_the_object,
    evaluate,
    load,
    prompt,
    score,
)
from .scenes import (
    ALL_KINDS,
    COLOR_NAMES,
    EXTRA_KINDS,
    REQUIRED_KINDS,
    SHAPES,
    Record,
    Scene,
    SceneObject,
    asked_objects,
    asked_tokens,
    generate,
    patch_labels,
    render,
)

EVAL_SEED = 31337  # the held-out seed of the documented numbers; training never uses it

__all__ = [
    "ALL_KINDS",
    "COLOR_NAMES",
    "EVAL_SEED",
    "EXTRA_KINDS",
    "MODEL_PATH",
    "MODEL_PATHS",
    "QWEN_MODEL_PATH",
    "REQUIRED_KINDS",
    "SHAPES",
    "Record",
    "Scene",
    "SceneObject",
    "answer",
    "answers_without_the_object",
    "asked_objects",
    "asked_tokens",
    "evaluate",
    "generate",
    "load",
    "patch_labels",
    "prompt",
    "render",
    "score",
]
