"""The eval CLI: lmms-eval plugin, sweeps that resume, tables and plots (offline, tiny model)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lmms_eval")

import vtc  # noqa: E402
from vtc.eval import sweep  # noqa: E402
from vtc.eval.sweep import SweepSpec  # noqa: E402


@pytest.fixture(autouse=True)
def task_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VTC_CACHE", str(tmp_path_factory.getbasetemp() / "vtc-cache"))


def _spec(model, out, **kw):
    base = dict(model=model, methods=["vtc_cls", "random"], budgets=[48, 16], limit=6, batch_size=3, out=str(out),
                device="cpu")
    return SweepSpec(**{**base, **kw})


def test_sweep_writes_rows_tables_and_plots(toy_shaped, tmp_path):
    out = sweep.run(_spec(toy_shaped, tmp_path), progress=False)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["cell"] for r in rows) == ["full", "random@16", "random@48", "vtc_cls@16", "vtc_cls@48"]
    for r in rows:
        assert 0.0 <= r["metrics"]["toy_vqa"]["exact_match"] <= 1.0
        assert {"color_exact_match", "shape_exact_match", "presence_exact_match"} <= set(r["metrics"]["toy_vqa"])
        assert r["costs"]["prefill_s"] > 0 and r["costs"]["kv_cache_bytes"] > 0
        assert r["versions"]["transformers"] and r["config"]["limit"] == 6
    by = {r["cell"]: r["costs"] for r in rows}
    assert by["full"]["equivalent_tokens"] == 144 and by["vtc_cls@16"]["equivalent_tokens"] == 16
    assert by["vtc_cls@16"]["flops"] < by["vtc_cls@48"]["flops"] < by["full"]["flops"]
    assert by["vtc_cls@16"]["kv_cache_bytes"] < by["full"]["kv_cache_bytes"]
    summary = (out / "summary.md").read_text()
    assert "vtc_cls@16" in summary and "toy_vqa exact_match" in summary
    assert (out / "summary.csv").read_text().count("\n") == 6
    for name in ("accuracy_vs_budget.png", "accuracy_vs_flops.png"):
        assert (out / name).stat().st_size > 10_000


def test_interrupted_sweep_resumes_each_cell_once(toy_shaped, tmp_path, monkeypatch):
    from lmms_eval import evaluator

    real, calls = evaluator.simple_evaluate, []

    def dies_on_second_cell(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    spec = _spec(toy_shaped, tmp_path, methods=["random"], budgets=[48, 16])
    monkeypatch.setattr(evaluator, "simple_evaluate", dies_on_second_cell)
    with pytest.raises(KeyboardInterrupt):
        sweep.run(spec, progress=False)
    assert len(sweep.read_results(tmp_path)) == 1
    monkeypatch.setattr(evaluator, "simple_evaluate", real)
    sweep.run(spec, progress=False)
    cells = [r["cell"] for r in sweep.read_results(tmp_path)]
    assert sorted(cells) == ["full", "random@16", "random@48"]
    sweep.run(spec, progress=False)  # nothing left: no new rows
    assert len(sweep.read_results(tmp_path)) == 3


def test_plugin_resolves_through_lmms_eval_registry(toy_shaped):
    from lmms_eval.models import MODEL_REGISTRY_V2, get_model

    from vtc.eval.lmms_plugin import VtcLMM

    assert MODEL_REGISTRY_V2.get_manifest("vtc").simple_class_path == "vtc.eval.lmms_plugin.VtcLMM"
    cls = get_model("vtc")
    assert cls is VtcLMM
    lm = cls.create_from_arg_string(f"pretrained={toy_shaped},method=vtc_cls,budget=16,batch_size=2,device=cpu")
    assert vtc.is_applied(lm.model) and lm.batch_size == 2
    assert vtc.plan(lm.model, "vtc_cls", 16).tokens_entering_llm == 16


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tasks": ["no_such_task"]}, "unknown lmms-eval task"),
        ({"methods": ["nope"]}, "unknown method 'nope'"),
        ({"budgets": [0]}, "keeps no visual token"),
        ({"budgets": [500]}, "above the model's 144"),
        ({"params": {"fastv.layer": 9}, "methods": ["fastv"]}, "fastv layer=9"),
        ({"params": {"lyer": 3}, "methods": ["fastv"]}, "'lyer' belongs to none of the methods"),
    ],
)
def test_invalid_flags_fail_before_the_model_loads(toy_shaped, tmp_path, monkeypatch, change, message):
    def no_loading(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(vtc, "from_pretrained", no_loading)
    with pytest.raises(vtc.VtcError, match=message):
        sweep.run(_spec(toy_shaped, tmp_path, **change), progress=False)
    assert not (tmp_path / "results.jsonl").exists()


def test_infeasible_cells_are_skipped_with_the_reason(toy_shaped):
    cells, infeasible = sweep.plan_cells(_spec(toy_shaped, "unused", methods=["fastv"], budgets=[100, 16]))
    assert [c.name for c in cells] == ["full", "fastv@100"]
    assert infeasible[0][0].name == "fastv@16" and "lowest feasible budget" in infeasible[0][1]


def test_default_methods_skip_those_that_do_not_apply(toy_shaped):
    # Every standalone method by default; hired needs LLaVA-NeXT's tiles, the toy is LLaVA.
    cells, infeasible = sweep.plan_cells(SweepSpec(model=toy_shaped, budgets=[48], out="unused"))
    assert "hired@48" not in [c.name for c in cells] and "vtc_cls@48" in [c.name for c in cells]
    assert [c.name for c, why in infeasible if "llava_next only" in why] == ["hired@48"]


def test_yaml_spec_and_cli_flags(toy_shaped, tmp_path):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(f"model: {toy_shaped}\nmethods: [random]\nbudgets: [16]\nlimit: 3\n")
    spec = SweepSpec.from_yaml(spec_file, limit=4)
    assert spec.methods == ["random"] and spec.limit == 4 and spec.model == toy_shaped
    spec_file.write_text("modle: x\n")
    with pytest.raises(vtc.VtcError, match="unknown key"):
        SweepSpec.from_yaml(spec_file)


def test_show_draws_each_stage(toy_shaped, tmp_path):
    from vtc.eval.show import show

    model, processor = vtc.from_pretrained(toy_shaped), vtc.load_processor(toy_shaped)
    answer = show(method="vtc_cls", budget=16, model=model, processor=processor, out=tmp_path / "kept.png")
    assert isinstance(answer, str) and (tmp_path / "kept.png").stat().st_size > 5_000
    assert not vtc.is_applied(model)


def test_plugin_takes_a_composed_method(toy_shaped):
    from lmms_eval.models import get_model

    lm = get_model("vtc").create_from_arg_string(f"pretrained={toy_shaped},method=vtc_cls+pdrop,budget=20,"
                                                 f"vtc_cls.keep=48,device=cpu")
    plan = lm.model.__dict__["_vtc"].plan
    assert plan.method == "vtc_cls+pdrop" and plan.tokens_entering_llm == 48
    assert len(plan.layer_stages) == 3 and abs(plan.equivalent_tokens - 20) < 1


def test_a_schedule_is_one_cell_without_budget(toy_shaped, tmp_path):
    spec = _spec(toy_shaped, tmp_path, methods=["schedule", "random"], budgets=[16],
                 params={"schedule": json.dumps({"counts": [144, 72, 36, 0]})})
    cells, _ = sweep.plan_cells(spec)
    assert [c.name for c in cells] == ["full", "schedule", "random@16"]


def test_plugin_applies_a_schedule_file(toy_shaped, tmp_path):
    from lmms_eval.models import get_model

    from vtc.eval.search import write_schedule

    path = write_schedule(tmp_path / "g.json", [144, 40, 20, 5], 144, model="toy-shaped")
    lm = get_model("vtc").create_from_arg_string(f"pretrained={toy_shaped},method=gsearch,schedule={path},device=cpu")
    assert lm.model.__dict__["_vtc"].plan.tokens_per_layer() == [144, 40, 20, 5]


def test_search_calibrates_on_an_lmms_eval_task(toy_shaped):
    from vtc.eval import search

    model, processor = vtc.from_pretrained(toy_shaped), vtc.load_processor(toy_shaped)
    records, accuracy = search.lmms_task_calibration("toy_vqa", 4, model, processor, 2)
    assert len(records) == 4 and records[0].question.endswith("?")
    assert 0.0 <= accuracy() <= 1.0
    calib = search.Calibration(model, processor, records, "kl", 2, accuracy=accuracy)
    assert calib([144, 144, 144, 144]) == pytest.approx(0.0, abs=1e-9)  # unreduced: no divergence
    assert calib([144, 10, 5, 0]) < 0
