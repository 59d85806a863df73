"""Random: keep a seeded random subset of each image's tokens before the LLM (baseline)."""

from __future__ import annotations

import dataclasses

from vtc.plan import ModelInfo, Plan, Scorer, Stage
from vtc.registry import register_method

from .base import PreLLMTopK


@register_method
@dataclasses.dataclass
class Random(PreLLMTopK):
    """Keep ``keep`` tokens per image drawn at random with ``seed`` (the same grid positions
    for every image of a forward, so batches equal single runs); positions compacted.

    Example:
        >>> from vtc.plan import ModelInfo
        >>> Random(seed=1).compile(ModelInfo("llava", 576, 32, 24, 22, True), 0.25).stages[0].keep
        144
    """

    name = "random"
    summary = "seeded random subset of each image's tokens before the LLM (baseline)"

    seed: int = 0
    positions: str = "compact"

    def compile(self, info: ModelInfo, budget=None) -> Plan:
        keep = self.resolve_keep(info, budget)
        stage = Stage("vision", Scorer("random", seed=self.seed), keep, positions=self.positions)
        return self._plan(info, (stage,), budget)
