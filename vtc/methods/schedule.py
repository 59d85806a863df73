"""Schedule: apply per-layer visual token counts, e.g. found by a search (G-Search, P-Sigmoid)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from vtc.errors import BudgetError, VtcError
from vtc.plan import ModelInfo, Plan, Scorer, Stage
from vtc.registry import register_method

from .base import Method


def load_schedule(schedule: str | Path | dict) -> dict:
    """A schedule as a dict: from a JSON file's path, inline JSON, or a dict already.

    It holds ``counts`` (visual tokens per image at each LLM layer) or ``fractions`` (of the
    per-image count), and, when written by a search, ``num_layers``, ``image_tokens``,
    ``model``, the metric reached, the settings and versions.

    Example:
        >>> load_schedule({"fractions": [1.0, 0.5]})["fractions"]
        [1.0, 0.5]
    """
    if isinstance(schedule, dict):
        return schedule
    if isinstance(schedule, str) and schedule.lstrip().startswith("{"):  # inline JSON (command lines)
        return json.loads(schedule)
    path = Path(schedule)
    if not path.is_file():
        raise VtcError(f"schedule file {path} does not exist; write one with `vtc search` or pass a dict")
    return json.loads(path.read_text())


def counts_for(schedule: dict, info: ModelInfo) -> list[int]:
    """Per-layer counts of ``schedule`` on a model described by ``info``, checked to fit it."""
    layers, n = schedule.get("num_layers"), schedule.get("image_tokens")
    if layers is not None and layers != info.num_layers:
        raise VtcError(f"this schedule was made for a model with {layers} LLM layers; this model has "
                       f"{info.num_layers}. Search a schedule for this model")
    if n is not None and "counts" in schedule and n != info.image_tokens:
        raise VtcError(f"this schedule counts tokens of images with {n} tokens; this model has {info.image_tokens} "
                       f"per image. Use a schedule in `fractions`, or search one for this model")
    if "counts" in schedule:
        counts = [int(c) for c in schedule["counts"]]
    elif "fractions" in schedule:
        counts = [round(f * info.image_tokens) for f in schedule["fractions"]]
    else:
        raise VtcError("a schedule needs `counts` or `fractions` (one entry per LLM layer)")
    if len(counts) != info.num_layers:
        raise VtcError(f"the schedule has {len(counts)} entries; this model has {info.num_layers} LLM layers")
    if counts[0] > info.image_tokens or any(c < 0 for c in counts):
        raise VtcError(f"schedule counts must be in [0, {info.image_tokens}], got {counts}")
    if any(b > a for a, b in zip(counts, counts[1:])):
        raise VtcError(f"schedule counts must not grow with depth (tokens dropped are gone), got {counts}")
    return counts


@register_method
@dataclasses.dataclass
class Schedule(Method):
    """Keep ``counts[l]`` visual tokens per image at LLM layer ``l``: a stage wherever the count
    falls, ranked by the last instruction token's attention at that layer (computed with the
    layer's own modules, as PyramidDrop scores); survivors keep their positions.

    Example:
        >>> from vtc.plan import ModelInfo
        >>> plan = Schedule({"counts": [16, 16, 8, 8, 4, 4]}).compile(ModelInfo("t", 16, 6, 4, 2, True))
        >>> [(s.where, s.keep) for s in plan.stages], plan.equivalent_tokens
        ([('layer:2', 8), ('layer:4', 4)], 9.333333333333334)
    """

    name = "schedule"
    summary = "per-layer token counts from a schedule file or dict (e.g. from G-Search or P-Sigmoid)"
    requires = ("schedule",)

    schedule: str | dict | None = None
    positions: str = "keep"

    def compile(self, info: ModelInfo, budget=None) -> Plan:
        if self.schedule is None:
            raise VtcError("the schedule method needs schedule=PATH (a JSON file) or a dict of per-layer counts")
        if budget is not None:
            raise BudgetError("a schedule sets its own per-layer counts; do not pass a budget with it")
        counts = counts_for(load_schedule(self.schedule), info)
        if counts[0] != info.image_tokens:
            raise VtcError(f"layer 0 must see all {info.image_tokens} tokens (the scores come from the LLM's layers)")
        stages, last = [], counts[0]
        for layer, c in enumerate(counts):
            if c < last:
                stages.append(Stage(f"layer:{layer}", Scorer("query_attention", (layer,)), c, positions=self.positions))
                last = c
        return self._plan(info, tuple(stages), budget)
