"""CDPruner: the subset of each image's tokens that maximizes a DPP conditioned on the instruction,
before the LLM (Zhang et al., NeurIPS 2025)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from vtc.plan import ModelInfo, Plan, Scorer, Stage
from vtc.registry import register_method

from .base import PreLLMTopK


@register_method
@dataclasses.dataclass
class CDPruner(PreLLMTopK):
    """Keep ``keep`` tokens per image by greedy MAP inference of a conditional DPP
    (:func:`vtc.ops.dpp_select`) whose kernel is ``r_i * cos(x_i, x_j) * r_j`` over the projected
    features ``x``, with ``r`` each token's relevance to the instruction
    (:func:`vtc.ops.instruction_relevance`: cosine similarity to the instruction's embeddings, averaged,
    min-max normalized per image). Kept tokens in original order; positions compacted. No attention is
    read.

    The instruction is the prompt's text after the sample's last image (the question), embedded by the
    LLM's input embeddings, compared with the projected features (both in the LLM's space): the
    official fallback for models without a CLIP text tower (``negative=False``). The official LLaVA
    code embeds the question with CLIP's text tower and the image with CLIP's visual projection and
    negates the similarity; Hugging Face LLaVA checkpoints carry neither projection, so that path is not
    available; ``negative=True`` applies the official sign. Default keep 128 of 576. See
    docs/methods/cdpruner.md.

    Example:
        >>> from vtc.plan import ModelInfo
        >>> CDPruner().compile(ModelInfo("llava", 576, 32, 24, 22, True)).stages[0].keep
        128
    """

    name = "cdpruner"
    summary = "CDPruner: conditional DPP (feature similarity weighted by relevance to the instruction) per image"

    default_keep: ClassVar[float] = 128 / 576
    negative: bool = False
    positions: str = "compact"

    def compile(self, info: ModelInfo, budget=None) -> Plan:
        stage = Stage("vision", Scorer("none"), self.resolve_keep(info, budget), reducer="cdpruner",
                      positions=self.positions, options=(("negative", int(self.negative)),))
        return self._plan(info, (stage,), budget)
