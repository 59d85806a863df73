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


def test_gsearch_stops_and_resumes_without_redoing_evaluations(toy_shaped, tmp_path, monkeypatch):
    from vtc.eval import search

    calls, real = [], search.Calibration.__call__

    def dies_after_three(self, counts):
        calls.append(list(counts))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, counts)

    spec = search.SearchSpec("gsearch", model=toy_shaped, limit=4, tolerance=1e-4, out=str(tmp_path / "s.json"),
                             batch_size=4)
    monkeypatch.setattr(search.Calibration, "__call__", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        search.run_search(spec)
    first = len(calls)
    journal = (tmp_path / "s.evals.jsonl").read_text().splitlines()
    assert len(journal) == first - 2  # the reference is not journaled; the 4th call died
    monkeypatch.setattr(search.Calibration, "__call__", lambda self, c: (calls.append(list(c)), real(self, c))[1])
    path = search.run_search(spec)
    redone = [c for c in calls[first:] if json.dumps(c) in {json.dumps(json.loads(x)["counts"]) for x in journal}]
    assert redone == []
    data = json.loads(path.read_text())
    assert data["counts"][0] == 144 and all(a >= b for a, b in zip(data["counts"], data["counts"][1:]))
    assert data["algorithm"] == "gsearch" and data["value"] >= data["reference"] - 1e-4
    assert vtc.plan(vtc.from_pretrained(toy_shaped), "gsearch", schedule=str(path)).tokens_per_layer() == \
        data["counts"]


def test_psigmoid_search_resumes_its_study(toy_shaped, tmp_path):
    from vtc.eval import search

    spec = search.SearchSpec("psigmoid", model=toy_shaped, limit=4, budget=48, trials=2,
                             out=str(tmp_path / "p.json"), batch_size=4)
    search.run_search(spec)
    spec.trials = 4
    data = json.loads(search.run_search(spec).read_text())
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "p.optuna.journal")))
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    assert len(study.trials) == 4
    tried = {(t.params["r_min"], t.params["slope"]) for t in study.trials}
    assert len(tried) == 4  # the resumed run drew new parameters, not the first run's again
    assert 46 <= sum(data["counts"]) / 4 <= 48 and data["params"]["r_min"] >= 0  # never over the budget


def test_psigmoid_refuses_a_budget_it_cannot_meet_before_loading(toy_shaped, tmp_path, monkeypatch):
    from vtc.eval import search

    monkeypatch.setattr(vtc, "from_pretrained", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    # Layer 0 keeps all 144 tokens of 4 layers: a schedule averages at least 36.
    for budget in (16, 0.2):
        spec = search.SearchSpec("psigmoid", model=toy_shaped, budget=budget, out=str(tmp_path / "p.json"))
        with pytest.raises(vtc.VtcError, match="pass a budget from 36 to 144"):
            search.run_search(spec)
    spec = search.SearchSpec("psigmoid", model=toy_shaped, budget=200, out=str(tmp_path / "p.json"))
    with pytest.raises(vtc.VtcError, match="psigmoid budgets on this model: 36 to 144"):
        search.run_search(spec)
    assert not list(tmp_path.iterdir())


def test_psigmoid_schedule_fits_its_budget_after_rounding():
    from vtc.eval.search import fit_budget
    from vtc.methods.psigmoid import psigmoid_counts

    for budget in (18.5, 20, 33, 47.9, 100):
        counts = fit_budget(psigmoid_counts(8, 144, 0.0, 2.0, budget / 144), budget)
        assert sum(counts) / 8 <= budget and sum(counts) / 8 > budget - 1
        assert counts[0] == 144 and all(a >= b for a, b in zip(counts, counts[1:]))


def test_gsearch_journal_is_keyed_by_what_changes_a_value(tmp_path):
    from vtc.eval import search

    base = search.SearchSpec("gsearch", model="toy", metric="kl", limit=64, out=str(tmp_path / "g.json"))
    key = base.key()
    for change in ({"metric": "accuracy"}, {"limit": 32}, {"model": "other/vlm"}, {"calib": "pope"},
                   {"batch_size": 8}):
        assert search.SearchSpec(**{**base.__dict__, **change}).key() != key, change
    # The tolerance only chooses which schedules are evaluated: evaluations are shared.
    assert search.SearchSpec(**{**base.__dict__, "tolerance": 0.5}).key() == key
    journal = tmp_path / "g.evals.jsonl"
    journal.write_text(json.dumps({"key": key, "counts": [144, 10], "value": -0.5}) + "\n"
                       + json.dumps({"key": "other", "counts": [144, 20], "value": -0.1}) + "\n"
                       + json.dumps({"counts": [144, 30], "value": -0.2}) + "\n")  # before keys: unknown settings
    assert search._journal(journal, key) == {"[144, 10]": -0.5}


def test_a_cut_off_journal_line_is_dropped_before_appending(tmp_path):
    from vtc.eval import search
    from vtc.eval.store import append_jsonl

    journal = tmp_path / "g.evals.jsonl"
    journal.write_text(json.dumps({"key": "k", "counts": [144, 10], "value": -0.5}) + '\n{"key": "k", "cou')
    assert search._journal(journal, "k") == {"[144, 10]": -0.5}
    append_jsonl(journal, {"key": "k", "counts": [144, 5], "value": -0.9})
    rows = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [r["counts"] for r in rows] == [[144, 10], [144, 5]]


def test_search_refuses_bad_settings():
    from vtc.eval.search import SearchSpec

    with pytest.raises(vtc.VtcError, match="pass --budget"):
        SearchSpec("psigmoid").check()
    with pytest.raises(vtc.VtcError, match="unknown metric"):
        SearchSpec("gsearch", metric="f1").check()
    for kw, message in [({"tolerance": -1.0}, "--tolerance -1.0: use a finite number >= 0"),
                        ({"tolerance": float("nan")}, "--tolerance nan"), ({"tolerance": float("inf")}, "--tolerance"),
                        ({"trials": 0}, "--trials 0: use an integer >= 1"), ({"limit": 0}, "--limit 0"),
                        ({"batch_size": -2}, "--batch-size -2"), ({"out": "/proc/vtc/s.json"}, "cannot write")]:
        with pytest.raises(vtc.VtcError, match=message):
            SearchSpec("gsearch", **kw).check()


def test_search_makes_the_schedule_folder_and_removes_it_when_it_fails(toy_shaped, tmp_path, monkeypatch):
    from vtc.eval import search

    monkeypatch.setattr(vtc, "from_pretrained", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no weights")))
    spec = search.SearchSpec("gsearch", model=toy_shaped, limit=4, out=str(tmp_path / "new" / "g.json"))
    with pytest.raises(RuntimeError, match="no weights"):
        search.run_search(spec)
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    spec.tolerance = 10.0  # everything is within tolerance: one reference, then a binary search per layer
    assert json.loads(search.run_search(spec).read_text())["counts"][0] == 144
    assert not (tmp_path / "new" / "g.json.lock").exists()
