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
                device="cpu", repeats=2)
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
    for r in rows:  # timed apart from the evaluation: warm-up, then repeats; medians and spreads
        c = r["costs"]
        assert c["timing"] == {"warmup": 1, "repeats": 2, "batch": 3}
        assert 0 < c["prefill_s_per_sample_min"] <= c["prefill_s_per_sample"] <= c["prefill_s_per_sample_max"]
        assert 0 < c["ttft_s_min"] <= c["ttft_s"] <= c["ttft_s_max"]  # one sample alone
        assert c["memory_measure"] == "rss" and c["peak_memory_bytes"] >= 0 and c["memory_base_bytes"] > 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["limit"] == 6 and settings["tasks"] == ["toy_vqa"] and settings["model_fingerprint"]
    summary = (out / "summary.md").read_text()
    assert "vtc_cls@16" in summary and "toy_vqa exact_match" in summary
    assert "TTFT ms min-max" in summary and "medians of 2 timed" in summary
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


def _no_loading(monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(vtc, "from_pretrained", no_loading)


def test_rerun_with_other_settings_refuses_and_names_the_difference(toy_shaped, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(toy_shaped, tmp_path / "copy")
    sweep.run(_spec(toy_shaped, out, methods=["random"], budgets=[16], limit=3), progress=False)
    before = (out / "results.jsonl").read_text()
    _no_loading(monkeypatch)
    for change, message in [({"limit": 4}, "limit 3 there, 4 here"), ({"batch_size": 2}, "batch_size 3 there, 2 here"),
                            ({"dtype": "bfloat16"}, "dtype 'float32' there, 'bfloat16' here"),
                            ({"tasks": ["toy_vqa", "toy_vqa"]}, "tasks"),
                            ({"repeats": 3}, "timing"), ({"model": str(tmp_path / "copy")}, "model ")]:
        with pytest.raises(vtc.VtcError, match=message) as e:
            model = change.pop("model", toy_shaped)
            sweep.run(_spec(model, out, **{"methods": ["random"], "budgets": [16], "limit": 3, **change}),
                      progress=False)
        assert "pass a new --out" in str(e.value) and "\n" not in str(e.value)
    assert (out / "results.jsonl").read_text() == before  # nothing mixed in
    # Other methods and budgets under the same settings join the same table (the model is loaded then).
    monkeypatch.undo()
    sweep.run(_spec(toy_shaped, out, methods=["vtc_cls"], budgets=[16], limit=3), progress=False)
    assert sorted(r["cell"] for r in sweep.read_results(out)) == ["full", "random@16", "vtc_cls@16"]


def test_changed_model_files_at_the_same_path_refuse(toy_shaped, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(toy_shaped, model)
    spec = _spec(str(model), tmp_path / "out", methods=["random"], budgets=[16], limit=3)
    out = tmp_path / "out"
    out.mkdir()
    assert sweep.check_settings(out, sweep.run_settings(spec))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "image_seq_length": 144}, indent=1))
    with pytest.raises(vtc.VtcError, match="the model's files changed"):
        sweep.check_settings(out, sweep.run_settings(spec))


def test_a_folder_without_settings_is_judged_by_its_rows(tmp_path):
    rows = [{"key": "k", "cell": "full", "config": {"model": "toy", "tasks": ["toy_vqa"], "limit": 6, "batch_size": 16,
                                                     "device": "cpu", "dtype": "float32", "attn": None}}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(vtc.VtcError, match="limit 6 there, None here"):
        sweep.check_settings(tmp_path, sweep.run_settings(SweepSpec(model="toy", device="cpu")))
    assert sweep.check_settings(tmp_path, sweep.run_settings(SweepSpec(model="toy", device="cpu", limit=6)))
    assert json.loads((tmp_path / "settings.json").read_text())["limit"] == 6


def test_a_second_sweep_into_a_locked_folder_refuses_at_once(toy_shaped, tmp_path, monkeypatch):
    import os

    (tmp_path / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": __import__("socket").gethostname()}))
    _no_loading(monkeypatch)
    with pytest.raises(vtc.VtcError, match=r"already running \(pid \d+.*pass another --out"):
        sweep.run(_spec(toy_shaped, tmp_path), progress=False)
    assert (tmp_path / ".lock").exists()  # the other run's lock stays


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from vtc.eval.store import OutputLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with OutputLock(tmp_path / ".lock", "a sweep"):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
        with pytest.raises(vtc.VtcError, match="already running"):
            OutputLock(tmp_path / ".lock", "a sweep").acquire()
    assert not (tmp_path / ".lock").exists()


def test_a_cut_off_last_line_is_dropped_and_its_cell_rerun(toy_shaped, tmp_path):
    spec = _spec(toy_shaped, tmp_path, methods=["random"], budgets=[16], limit=3)
    sweep.run(spec, progress=False)
    path = tmp_path / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # killed while writing the second row
    sweep.run(spec, progress=False)
    rows = [json.loads(line) for line in path.read_text().splitlines()]  # every line parses
    assert sorted(r["cell"] for r in rows) == ["full", "random@16"]


def test_failed_runs_leave_no_folders(toy_shaped, tmp_path, monkeypatch):
    _no_loading(monkeypatch)
    out = tmp_path / "new" / "deeper"
    with pytest.raises(AssertionError, match="was loaded"):
        sweep.run(_spec(toy_shaped, out), progress=False)
    assert not (tmp_path / "new").exists()


def test_an_unwritable_output_folder_fails_before_the_model_loads(toy_shaped, tmp_path, monkeypatch):
    _no_loading(monkeypatch)
    (tmp_path / "file").write_text("")
    for out in ("/proc/vtc-sweep", tmp_path / "file" / "out"):
        with pytest.raises(vtc.VtcError, match="cannot write to"):
            sweep.run(_spec(toy_shaped, out), progress=False)


@pytest.mark.parametrize(
    ("text", "check"),
    [
        ("methods: vtc_cls\nbudgets: 16\ntasks: toy_vqa\n", lambda s: s.methods == ["vtc_cls"] and s.budgets == [16]),
        ("methods: fastv, random\nbudgets: '0.5,16'\n", lambda s: s.methods == ["fastv", "random"]
         and s.budgets == [0.5, 16]),
        ("limit: abc\n", "limit must be an integer"),
        ("budgets: [abc]\n", "budget 'abc' is not a number"),
        ("methods: [1, 2]\n", "methods must hold names"),
        ("batch_size: 0\n", "batch_size must be an integer >= 1"),
        ("dtype: float33\n", "dtype 'float33' is not one of"),
        ("params: [a]\n", "params must map names"),
        ("methods: [vtc_cls\n", "not valid YAML at line"),
        ("- a\n- b\n", "must be a mapping"),
    ],
)
def test_yaml_specs_are_normalized_or_refused_in_one_line(tmp_path, text, check):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    if callable(check):
        assert check(SweepSpec.from_yaml(path))
    else:
        with pytest.raises(vtc.VtcError, match=check) as e:
            SweepSpec.from_yaml(path)
        assert "\n" not in str(e.value)


def test_peak_memory_is_the_cells_not_the_process(tmp_path):
    import torch

    from vtc.eval.cost import PeakMemory

    with PeakMemory("cpu") as big:
        x = torch.ones(64, 2**20)  # 256 MiB, touched
        del x
    with PeakMemory("cpu") as small:
        y = torch.ones(1024)
        del y
    assert big.how == "rss"
    assert big.peak_bytes >= 200 * 2**20 and small.peak_bytes < 64 * 2**20


def test_lmms_eval_bars_are_quiet_unless_verbose():
    from lmms_eval import evaluator
    from lmms_eval.api import task

    with sweep.quiet_lmms_bars():
        assert evaluator.tqdm(total=3, desc="Postprocessing").disable and task.tqdm(range(3)).disable
    with sweep.quiet_lmms_bars(quiet=False):
        assert not evaluator.tqdm(total=3, disable=False).disable


def test_one_labeled_bar_per_cell(toy_shaped, tmp_path, capfd):
    sweep.run(_spec(toy_shaped, tmp_path, methods=["random"], budgets=[16], limit=2), progress=True)
    err = capfd.readouterr().err
    assert "cell 1/2 full" in err and "cell 2/2 random@16" in err
    assert "Postprocessing" not in err and "vtc responding" not in err


def test_speedups_compare_timings_taken_the_same_way():
    from vtc.eval.report import _speedup

    legacy_full = {"prefill_s_per_sample": 0.010}  # a row from before the timed repeats
    full = {"prefill_s_per_sample": 0.008, "prefill_s_per_sample_eval": 0.010, "timing": {"repeats": 5}}
    cell = {"prefill_s_per_sample": 0.002, "prefill_s_per_sample_eval": 0.005, "timing": {"repeats": 5}}
    assert _speedup(full, cell) == pytest.approx(4.0)  # timed medians on both sides
    assert _speedup(legacy_full, cell) == pytest.approx(2.0)  # evaluation passes on both sides


def test_under_accelerate_only_rank_0_locks_and_writes(toy_shaped, tmp_path, monkeypatch):
    import os
    import socket

    (tmp_path / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # rank 0's
    monkeypatch.setattr(sweep, "_is_main_process", lambda: False)
    _no_loading(monkeypatch)
    with pytest.raises(AssertionError, match="was loaded"):  # rank 1 went on to load the model
        sweep.run(_spec(toy_shaped, tmp_path), progress=False)
    assert (tmp_path / ".lock").exists() and not (tmp_path / "settings.json").exists()
