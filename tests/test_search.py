"""Searched schedules: the G-Search walk, the P-Sigmoid shape, and applying a schedule."""

from __future__ import annotations

import json

import pytest

import vtc
from vtc.eval.search import gsearch, write_schedule
from vtc.methods.psigmoid import psigmoid, solve_center


def test_gsearch_finds_the_known_answer_of_a_monotone_stub():
    need = [16, 12, 12, 7, 7, 2]  # the metric holds while every layer keeps at least its need

    def metric(counts):
        return 1.0 - 0.1 * sum(c < n for c, n in zip(counts, need))

    counts, evaluations = gsearch(metric, 6, 16, tolerance=0.05)
    assert counts == need
    assert evaluations <= 1 + 5 * 5  # a binary search per layer
    assert all(a >= b for a, b in zip(counts, counts[1:]))


def test_psigmoid_meets_the_budget_and_never_grows():
    center = solve_center(8, 0.1, 1.5, 0.4)
    fracs = psigmoid(8, 0.1, 1.5, center)
    assert fracs[0] == 1.0 and all(a >= b for a, b in zip(fracs, fracs[1:]))
    assert abs(sum(fracs) / 8 - 0.4) < 1e-6 and min(fracs) >= 0.1


def test_schedule_applies_and_refuses_another_model(model, tmp_path):
    path = write_schedule(tmp_path / "s.json", [16, 16, 8, 8, 4, 4], 16, model="tiny", metric={"kl": 0.01})
    plan = vtc.plan(model, "schedule", schedule=str(path))
    assert plan.tokens_per_layer() == [16, 16, 8, 8, 4, 4]
    data = json.loads(path.read_text())
    with pytest.raises(vtc.VtcError, match="made for a model with 5 LLM layers; this model has 6"):
        vtc.plan(model, "schedule", schedule={**data, "num_layers": 5})
    with pytest.raises(vtc.VtcError, match="images with 576 tokens"):
        vtc.plan(model, "schedule", schedule={"counts": data["counts"], "image_tokens": 576})
    with pytest.raises(vtc.VtcError, match="must not grow with depth"):
        vtc.plan(model, "schedule", schedule={"counts": [16, 8, 9, 8, 4, 4]})
    with pytest.raises(vtc.BudgetError, match="do not pass a budget"):
        vtc.plan(model, "schedule", 8, schedule=str(path))
