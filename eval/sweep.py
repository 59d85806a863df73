"""Budget sweeps: methods x budgets x lmms-eval tasks on one loaded model, with costs.

Every finished cell is appended to ``results.jsonl`` (configuration, metrics, costs,
versions); rerunning the same sweep skips finished cells, so a killed sweep loses at most
the cell in flight. ``summary.md``, ``summary.csv`` and the plots are rewritten from the
file after every cell.

Example:
    >>> run(SweepSpec(methods=["vtc_cls"], budgets=[64], limit=20, out="runs/demo"))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import vtc
from vtc.budget import resolve_count
from vtc.errors import BudgetError, MethodNotApplicableError, VtcError
from vtc.methods.composed import create_method, split_spec
from vtc.registry import get_adapter, get_method

# LLaVA-1.5's literature budgets, 192/128/64 of 576, as fractions so they carry to any model.
DEFAULT_BUDGETS = (192 / 576, 128 / 576, 64 / 576)
TOY_MODEL = "toy"


@dataclass
class SweepSpec:
    """What a sweep runs. Every field is also a ``vtc sweep`` flag and a key of a YAML spec.

    ``params`` maps ``"key"`` (every method that has it) or ``"method.key"`` to a value.
    """

    model: str = TOY_MODEL
    methods: list[str] = field(default_factory=lambda: vtc.list_methods(standalone=True))
    budgets: list[int | float] = field(default_factory=lambda: list(DEFAULT_BUDGETS))
    tasks: list[str] = field(default_factory=lambda: ["toy_vqa"])
    limit: int | None = None
    batch_size: int = 16
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "float32"
    attn: str | None = None
    out: str = "runs/sweep"
    params: dict = field(default_factory=dict)
    include_path: list[str] = field(default_factory=list)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> SweepSpec:
        """Read a spec file; ``overrides`` (non-None) win over the file."""
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise VtcError(f"unknown key(s) {sorted(unknown)} in {path}; allowed: "
                           f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)

    def model_path(self) -> str:
        if self.model == TOY_MODEL:
            from vtc.eval.toy import MODEL_PATH

            return str(MODEL_PATH)
        return self.model

    def method_params(self, method: str) -> dict:
        """The ``params`` that apply to ``method`` (a name or a composition ``a+b``)."""
        parts = split_spec(method)
        out = {}
        for key, value in self.params.items():
            scope, _, name = key.rpartition(".")
            for part in parts:
                if scope in ("", part, method) and name in get_method(part).param_names():
                    out[f"{part}.{name}" if len(parts) > 1 else name] = value
        return out


@dataclass(frozen=True)
class Cell:
    """One point of the sweep: a method at a budget (``method=None``: the unreduced model)."""

    method: str | None
    budget: int | float | None
    params: tuple = ()

    @property
    def name(self) -> str:
        if self.method is None:
            return "full"
        if self.budget is not None:
            return f"{self.method}@{self.budget:g}"
        schedule = dict(self.params).get("schedule")  # tell schedules apart by their file
        return f"{self.method}({Path(str(schedule)).stem})" if schedule and not str(schedule).startswith("{") \
            else self.method


def _meta_model(path: str):
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def plan_cells(spec: SweepSpec) -> tuple[list[Cell], list[tuple[Cell, str]]]:
    """The cells to run and those a method cannot reach (with the reason); checks every
    method, parameter and budget against the model's configuration, loading no weights."""
    for method in spec.methods:
        create_method(method, spec.method_params(method))
    for key in spec.params:
        scope, _, name = key.rpartition(".")
        if not any(name in get_method(p).param_names() for m in spec.methods for p in split_spec(m)
                   if scope in ("", m, p)):
            raise VtcError(f"parameter {key!r} belongs to none of the methods {spec.methods}; "
                           f"`vtc methods` lists each method's parameters")
    meta = _meta_model(spec.model_path())
    info = get_adapter(meta).info()
    for b in spec.budgets:
        resolve_count(b, info.image_tokens)  # 0, negative or above the model's count: an error
    cells, infeasible = [Cell(None, None)], []
    for method in spec.methods:
        params = spec.method_params(method)
        # A schedule sets its own per-layer counts: one cell, no budget.
        budgets = [None] if any(get_method(p).requires for p in split_spec(method)) else spec.budgets
        for b in budgets:
            cell = Cell(method, b, tuple(sorted(params.items())))
            try:
                vtc.plan(meta, method, b, **params)
                cells.append(cell)
            except (BudgetError, MethodNotApplicableError) as e:  # e.g. hired on a model without tiles
                infeasible.append((cell, str(e)))
    return cells, infeasible


def prepare_tasks(spec: SweepSpec):
    """A TaskManager that knows ``spec.tasks`` (the toy task prepared offline); errors name unknown tasks."""
    from lmms_eval.tasks import TaskManager

    include = list(spec.include_path)
    only_toy = set(spec.tasks) <= {"toy_vqa"}
    if "toy_vqa" in spec.tasks:
        from vtc.eval.toy_task import prepare

        include.append(str(prepare()))
    manager = TaskManager(include_path=include or None, include_defaults=not only_toy)
    unknown = [t for t in spec.tasks if t not in manager.all_tasks]
    if unknown:
        raise VtcError(f"unknown lmms-eval task(s) {unknown}; see `lmms-eval --tasks list`, or pass --include-path")
    return manager


def cell_key(spec: SweepSpec, cell: Cell) -> str:
    """What identifies a finished cell in ``results.jsonl``."""
    ident = {"model": spec.model, "method": cell.method, "budget": cell.budget, "params": list(cell.params),
             "tasks": sorted(spec.tasks), "limit": spec.limit, "batch_size": spec.batch_size,
             "dtype": spec.dtype, "attn": spec.attn, "device": spec.device}
    return hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_results(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: the cell reruns
                continue
    return rows


def versions() -> dict:
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for pkg in ("vtc", "torch", "transformers", "lmms_eval", "accelerate"):
        try:
            out[pkg] = version(pkg.replace("_", "-"))
        except Exception:
            out[pkg] = None
    return out


def _metrics(results: dict) -> dict:
    out = {}
    for task, values in results["results"].items():
        out[task] = {k.split(",")[0]: v for k, v in values.items()
                     if isinstance(v, (int, float)) and "stderr" not in k and k != "alias"}
    return out


def _costs(records: list[dict], peak: int) -> dict:
    def mean(key):
        vals = [r[key] for r in records if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    return {
        "tokens_entering_llm": mean("tokens_entering_llm"),
        "equivalent_tokens": mean("equivalent_tokens"),
        "flops": mean("flops"),
        "flops_full": mean("flops_full"),
        "prefill_s": mean("prefill_s"),
        "prefill_s_per_sample": sum(r["prefill_s"] for r in records) / max(1, sum(r["batch"] for r in records)),
        "ttft_s": mean("ttft_s"),
        "kv_cache_bytes": mean("kv_cache_bytes"),
        "peak_memory_bytes": peak,
        "generate_calls": len(records),
    }


def _peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's high-water mark


def run(spec: SweepSpec, progress: bool = True) -> Path:
    """Run the sweep (skipping finished cells) and write tables and plots; returns the out dir."""
    from lmms_eval.evaluator import simple_evaluate
    from tqdm import tqdm

    from vtc.eval.lmms_plugin import VtcLMM, process_device
    from vtc.eval.report import write_reports

    cells, infeasible = plan_cells(spec)
    manager = prepare_tasks(spec)
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    for cell, why in infeasible:
        print(f"skipping {cell.name}: {why}")
    done = {row["key"] for row in read_results(out)}
    todo = [c for c in cells if cell_key(spec, c) not in done]
    if not todo:
        print(f"all {len(cells)} cells already in {out / 'results.jsonl'}")
        write_reports(out)
        return out

    path = spec.model_path()
    kwargs = {"dtype": getattr(torch, spec.dtype)}
    if spec.attn:
        kwargs["attn_implementation"] = spec.attn
    model = vtc.from_pretrained(path, **kwargs).to(process_device(spec.device))
    processor = vtc.load_processor(path)
    lm = VtcLMM.wrap(model, processor, batch_size=spec.batch_size)
    bar = tqdm(todo, desc="sweep", unit="cell", disable=not progress)
    for cell in bar:
        bar.set_postfix_str(cell.name)
        lm.costs.clear()
        if cell.method is not None:
            vtc.apply(model, cell.method, cell.budget, **dict(cell.params))
        _peak_reset(spec.device)
        start = time.time()
        try:
            results = simple_evaluate(model=lm, tasks=spec.tasks, limit=spec.limit, task_manager=manager,
                                      batch_size=spec.batch_size, log_samples=False, verbosity="WARNING")
        finally:
            if cell.method is not None:
                vtc.remove(model)
        if results is None or not lm.accelerator.is_main_process:  # under accelerate, rank 0 writes
            continue
        row = {
            "key": cell_key(spec, cell),
            "cell": cell.name,
            "config": {**{k: v for k, v in dataclasses.asdict(spec).items() if k not in ("methods", "budgets")},
                       "method": cell.method, "budget": cell.budget, "params": dict(cell.params)},
            "metrics": _metrics(results),
            "costs": _costs(lm.costs, _peak(spec.device)),
            "seconds": time.time() - start,
            "versions": versions(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        with (out / "results.jsonl").open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        write_reports(out)
    return out
