"""Budget sweeps: methods x budgets x lmms-eval tasks on one loaded model, with costs.

Every finished cell is appended to ``results.jsonl`` (configuration, metrics, costs,
versions); rerunning the same sweep skips finished cells, so a killed sweep loses at most
the cell in flight. ``summary.md``, ``summary.csv`` and the plots are rewritten from the
file after every cell.

Example:
    >>> run(SweepSpec(methods=["vtc_cls"], budgets=[64], limit=20, out="runs/demo"))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import vtc
from vtc.budget import resolve_count
from vtc.errors import BudgetError, MethodNotApplicableError, VtcError
from vtc.eval.store import OutputLock, append_jsonl, check_writable, model_fingerprint, read_jsonl, repair_jsonl
from vtc.methods.composed import create_method, split_spec
from vtc.registry import get_adapter, get_method

# LLaVA-1.5's literature budgets, 192/128/64 of 576, as fractions so they carry to any model.
DEFAULT_BUDGETS = (192 / 576, 128 / 576, 64 / 576)
TOY_MODEL = "toy"
TOY_MODELS = {"toy": "llava", "toy-qwen": "qwen2_5_vl"}  # --model name -> the family of a bundled toy


DTYPES = ("float32", "bfloat16", "float16", "float64")


def _text(value, key: str) -> str:
    if isinstance(value, Path):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise VtcError(f"{key} must be a non-empty string, got {value!r}")
    return value.strip()


def _names(value, key: str, empty: bool = False) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]``; a lone string is one entry, never its letters."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise VtcError(f"{key} must be a list (or a comma-separated string), got {value!r}")
    out = [str(v).strip() if isinstance(v, (str, Path)) else v for v in items]
    bad = [v for v in out if not isinstance(v, str) or not v]
    if bad:
        raise VtcError(f"{key} must hold names, got {bad[0]!r} in {value!r}")
    if not out and not empty:
        raise VtcError(f"{key} is empty: give at least one")
    return out


def _budget(value) -> int | float:
    """A budget: a count (int) or a fraction (float); a string is parsed like the ``--budgets`` flag."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text) if any(c in text for c in ".eE") else int(text)
        except ValueError:
            raise VtcError(f"budget {value!r} is not a number: give a count like 192 or a fraction like 0.25") \
                from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise VtcError(f"budget {value!r} is not a number: give a count like 192 or a fraction like 0.25")
    return value


def _count(value, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise VtcError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def model_path(model: str) -> str:
    """Where a ``--model`` loads from: the bundled toy model's folder for ``toy`` (LLaVA-1.5 format) and
    ``toy-qwen`` (Qwen2.5-VL format), else as given.

    Example:
        >>> model_path("toy-qwen").endswith("model-qwen")
        True
    """
    if model in TOY_MODELS:
        from vtc.eval.toy import MODEL_PATHS

        return str(MODEL_PATHS[TOY_MODELS[model]])
    return model


@dataclass
class SweepSpec:
    """What a sweep runs. Every field is also a ``vtc sweep`` flag and a key of a YAML spec.

    ``params`` maps ``"key"`` (every method that has it) or ``"method.key"`` to a value.
    """

    model: str = TOY_MODEL
    # Every method that runs on a budget alone and reduces images (the default tasks); video-only ones when named.
    methods: list[str] = field(default_factory=lambda: vtc.list_methods(standalone=True, images=True))
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
    warmup: int = 1  # untimed generate calls before the timed ones, per cell
    repeats: int = 5  # timed calls per cell: the median and the spread are reported
    backend: str = "hf"  # "vllm": each cell through a vLLM server (vtc.eval.served), batch_size requests at once

    def __post_init__(self) -> None:
        """Normalize what a YAML file or a caller may give (``methods: fastv`` is one method,
        ``budgets: 0.25`` one budget) and refuse wrong types with one line naming the key."""
        self.model = _text(self.model, "model")
        self.methods = _names(self.methods, "methods")
        self.tasks = _names(self.tasks, "tasks")
        self.include_path = _names(self.include_path, "include_path", empty=True)
        self.budgets = [_budget(b) for b in (self.budgets if isinstance(self.budgets, (list, tuple))
                                             else [self.budgets] if isinstance(self.budgets, (int, float))
                                             else _names(self.budgets, "budgets"))]
        if not self.budgets:
            raise VtcError("budgets is empty: give at least one, e.g. --budgets 192,128 or 0.25")
        self.limit = None if self.limit is None else _count(self.limit, "limit")
        self.batch_size = _count(self.batch_size, "batch_size")
        self.repeats = _count(self.repeats, "repeats")
        self.warmup = _count(self.warmup, "warmup", minimum=0)
        self.device = _text(self.device, "device")
        self.dtype = _text(self.dtype, "dtype")
        if self.dtype not in DTYPES:
            raise VtcError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        self.attn = None if self.attn is None else _text(self.attn, "attn")
        self.out = _text(self.out, "out")
        self.backend = _text(self.backend, "backend")
        if self.backend not in ("hf", "vllm"):
            raise VtcError(f"backend {self.backend!r}: use hf (transformers, vtc.apply) or vllm (a vLLM server)")
        if not isinstance(self.params, dict) or not all(isinstance(k, str) for k in self.params):
            raise VtcError(f"params must map names to values (e.g. {{fastv.layer: 3}}), got {self.params!r}")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> SweepSpec:
        """Read a spec file; ``overrides`` (non-None) win over the file.

        Example:
            >>> SweepSpec.from_yaml("sweep.yaml", limit=20)  # doctest: +SKIP
        """
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise VtcError(f"cannot read the spec {path}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise VtcError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
        data = data or {}
        if not isinstance(data, dict):
            raise VtcError(f"{path} must be a mapping of keys (model:, methods:, budgets:, ...), "
                           f"not a {type(data).__name__}")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise VtcError(f"unknown key(s) {sorted(map(str, unknown))} in {path}; allowed: "
                           f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)

    def model_path(self) -> str:
        return model_path(self.model)

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
    """The model's architecture on the meta device (its config only): a missing path or a model
    that is not an image-text-to-text one is a one-line error, before any weights load."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VtcError(f"cannot load a model config from {path!r} (a folder with config.json, or a hub id in "
                       f"the local cache): {first}") from None
    try:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
    except (ValueError, KeyError):
        raise VtcError(f"{path!r} is a {getattr(config, 'model_type', '?')!r} model, not a vision-language model "
                       f"that vtc supports (`vtc models` lists them)") from None
    get_adapter(model)  # an architecture vtc has no adapter for: a one-line error
    return model


def check_device(device: str) -> None:
    """Refuse a device that this machine does not have, before any weights load.

    Example:
        >>> check_device("cpu")
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise VtcError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise VtcError(f"device {device!r} asked for, but no CUDA GPU is available here: pass --device cpu")
        if dev.index is not None and dev.index >= count:
            raise VtcError(f"device {device!r}: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise VtcError(f"device {device!r} asked for, but MPS is not available here: pass --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise VtcError(f"device {device!r}: vtc sweeps run on cpu, cuda or mps")


def check_attention(attn: str | None) -> None:
    """Refuse an attention implementation transformers does not know (or cannot run here).

    Example:
        >>> check_attention("flash")
        Traceback (most recent call last):
        ...
        vtc.errors.VtcError: unknown attention implementation 'flash': use one of eager, ...
    """
    if attn is None or "/" in attn:  # a hub kernel (kernels-community/...) is checked by transformers
        return
    from transformers import AttentionInterface

    known = ["eager", *AttentionInterface._global_mapping]
    if attn not in known:
        raise VtcError(f"unknown attention implementation {attn!r}: use one of {', '.join(known)}")
    if attn.startswith("flash_attention"):
        import importlib.util

        package = {"flash_attention_2": "flash_attn"}.get(attn, "flash_attn_interface")
        if importlib.util.find_spec(package) is None:
            raise VtcError(f"attention {attn!r} needs the {package} package, which is not installed: "
                           f"install it or use --attn sdpa")


def check_param_types(method: str, params: dict) -> None:
    """Refuse a native parameter whose value has the wrong kind (``ratio=abc`` where a number is
    expected), naming the method and the parameter.

    Example:
        >>> check_param_types("pdrop", {"ratio": "abc"})
        Traceback (most recent call last):
        ...
        vtc.errors.VtcError: pdrop ratio='abc': expects a number
    """
    parts = split_spec(method)
    for key, value in params.items():
        scope, _, name = key.rpartition(".")
        for part in parts:
            if scope not in ("", part):
                continue
            f = next((f for f in dataclasses.fields(get_method(part)) if f.name == name), None)
            if f is None or value is None:
                continue
            kind = str(f.type).replace(" ", "")
            number = (isinstance(f.default, (int, float)) and not isinstance(f.default, bool)) or \
                kind in ("int", "float", "int|None", "float|None", "int|float", "int|float|None")
            if number and (isinstance(value, bool) or not isinstance(value, (int, float))):
                hint = f" (its default is {f.default!r})" if isinstance(f.default, (int, float)) else ""
                raise VtcError(f"{part} {name}={value!r}: expects a number{hint}")
            if kind.startswith("tuple") and isinstance(value, str):
                raise VtcError(f"{part} {name}={value!r}: expects integers separated by commas, e.g. {name}=8,16")


def plan_cells(spec: SweepSpec) -> tuple[list[Cell], list[tuple[Cell, str]]]:
    """The cells to run and those a method cannot reach (with the reason); checks every
    method, parameter and budget against the model's configuration, loading no weights."""
    for method in spec.methods:
        check_param_types(method, spec.method_params(method))
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
    """A TaskManager that knows ``spec.tasks`` (the toy tasks prepared offline); errors name unknown tasks."""
    from lmms_eval.tasks import TaskManager

    from vtc.eval.toy_task import TASKS, prepare

    include = list(spec.include_path)
    only_toy = set(spec.tasks) <= set(TASKS)
    include += [str(prepare(task=task)) for task in spec.tasks if task in TASKS]
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
    """The finished cells in ``out/results.jsonl`` (a cut-off line is left out: its cell reruns).

    Example:
        >>> read_results(Path("/nonexistent"))
        []
    """
    return [row for row in read_jsonl(Path(out) / "results.jsonl") if "key" in row]


SETTINGS_FILE = "settings.json"


def run_settings(spec: SweepSpec) -> dict:
    """What every cell of one output folder shares: a value measured under other settings does
    not belong in the same table (ratios are taken against the folder's ``full`` cell).

    Example:
        >>> run_settings(SweepSpec(model="org/vlm", limit=20, device="cpu"))["limit"]
        20
    """
    return {"model": spec.model, "model_fingerprint": model_fingerprint(spec.model_path()),
            "tasks": sorted(spec.tasks), "limit": spec.limit, "batch_size": spec.batch_size, "device": spec.device,
            "dtype": spec.dtype, "attn": spec.attn, "timing": {"warmup": spec.warmup, "repeats": spec.repeats},
            # a vLLM folder's figures are the server's (an HF folder's settings are as before)
            **({"backend": spec.backend} if spec.backend != "hf" else {})}


def _legacy_settings(row: dict) -> dict:
    """The settings of a row written before ``settings.json`` existed (what its config holds)."""
    cfg = row.get("config", {})
    keys = ("model", "limit", "batch_size", "device", "dtype", "attn")
    return {**{k: cfg[k] for k in keys if k in cfg}, **({"tasks": sorted(cfg["tasks"])} if "tasks" in cfg else {})}


def settings_difference(old: dict, new: dict) -> str | None:
    """The keys in which two runs' settings differ, for a one-line message (None: the same).

    Example:
        >>> settings_difference({"limit": 6, "dtype": "float32"}, {"limit": 4, "dtype": "float32"})
        'limit 6 there, 4 here'
    """
    diffs = []
    if old.get("backend", "hf") != new.get("backend", "hf"):  # absent in an HF folder's settings
        diffs.append(f"backend {old.get('backend', 'hf')!r} there, {new.get('backend', 'hf')!r} here")
    for key, value in old.items():
        if key == "backend":
            continue
        if key not in new or new[key] == value:
            continue
        if key == "model_fingerprint":
            if value is not None and new[key] is not None:
                diffs.append("the model's files changed since (config or weights)")
        else:
            diffs.append(f"{key} {value!r} there, {new[key]!r} here")
    return "; ".join(diffs) or None


def check_settings(out: Path, settings: dict, write: bool = True) -> bool:
    """Refuse a run whose settings differ from those ``out`` holds; record them (``write``) when
    ``out`` has none. Returns whether ``settings.json`` was written now.

    Example:
        >>> check_settings(Path("runs/demo"), run_settings(SweepSpec(limit=20)))  # doctest: +SKIP
        True
    """
    path = out / SETTINGS_FILE
    if path.is_file():
        try:
            recorded = [json.loads(path.read_text())]
        except ValueError:
            raise VtcError(f"{path} is not valid JSON: restore it, or pass a new --out") from None
    else:
        recorded = [_legacy_settings(row) for row in read_results(out)]
    for old in recorded:
        diff = settings_difference(old, settings)
        if diff:
            raise VtcError(f"{out} holds results of other settings ({diff}; see {path}): pass a new --out for "
                           f"this run, or delete {out} to redo it")
    if path.is_file() or not write:
        return False
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(settings, indent=2) + "\n")
    os.replace(tmp, path)  # whole or absent for a reader in another process
    return True


def _is_main_process() -> bool:
    """Whether this process writes the output (under ``accelerate launch``, rank 0 only)."""
    from accelerate import PartialState

    return PartialState().is_main_process


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


def result_row(spec: SweepSpec, cell: Cell, results: dict, costs: dict, start: float) -> dict:
    """The ``results.jsonl`` row of a finished cell (either backend): its key, settings, metrics and costs."""
    return {
        "key": cell_key(spec, cell),
        "cell": cell.name,
        "config": {**{k: v for k, v in dataclasses.asdict(spec).items() if k not in ("methods", "budgets")},
                   "method": cell.method, "budget": cell.budget, "params": dict(cell.params)},
        "metrics": _metrics(results),
        "costs": costs,
        "seconds": time.time() - start,
        "versions": versions(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _costs(records: list[dict], memory, timing: dict) -> dict:
    """A cell's costs: token counts and FLOPs (means over its ``generate`` calls), the timed
    repeats (``timing``: medians and spreads), and the cell's peak memory."""
    def mean(key):
        vals = [r[key] for r in records if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    per_sample = sum(r["prefill_s"] for r in records) / max(1, sum(r["batch"] for r in records))
    return {
        "tokens_entering_llm": mean("tokens_entering_llm"),
        "equivalent_tokens": mean("equivalent_tokens"),
        "flops": mean("flops"),
        "flops_full": mean("flops_full"),
        "prefill_s": mean("prefill_s"),  # the evaluation pass, per batch
        "prefill_s_per_sample": per_sample,  # replaced by the timed median below
        "ttft_s": mean("ttft_s"),  # replaced by the timed one-sample median below
        "kv_cache_bytes": mean("kv_cache_bytes"),
        "generate_calls": len(records),
        "prefill_s_per_sample_eval": per_sample,
        "ttft_s_batch": mean("ttft_s"),
        **timing,
        "peak_memory_bytes": memory.peak_bytes,
        "memory_base_bytes": memory.base_bytes,
        "memory_measure": memory.how,
    }


def time_cell(lm, warmup: int, repeats: int) -> dict:
    """Time the cell's first batch (prefill per sample) and its first sample alone (time to first
    token), ``warmup`` untimed then ``repeats`` timed ``generate`` calls of one new token each,
    batch and single sample interleaved; medians with their min and max.

    Example:
        >>> time_cell(lm, warmup=1, repeats=5)["ttft_s"]  # doctest: +SKIP
        0.0123
    """
    from vtc.eval.cost import spread
    from vtc.eval.meter import GenerateMeter

    if getattr(lm, "first_request", None) is None:
        return {}
    contexts, visuals = lm.first_request
    batch, one = lm.inputs(contexts, visuals), lm.inputs(contexts[:1], visuals[:1])
    meter = GenerateMeter(lm.model)

    def once(inputs):
        with meter.measure(inputs):
            lm.model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)

    with torch.no_grad():
        for _ in range(warmup):
            once(batch)
            once(one)
        meter.records.clear()
        for _ in range(repeats):
            once(batch)
            once(one)
    prefill = spread([r["prefill_s"] / r["batch"] for r in meter.records[0::2]])
    ttft = spread([r["ttft_s"] for r in meter.records[1::2]])
    return {"prefill_s_per_sample": prefill[0], "prefill_s_per_sample_min": prefill[1],
            "prefill_s_per_sample_max": prefill[2], "ttft_s": ttft[0], "ttft_s_min": ttft[1], "ttft_s_max": ttft[2],
            "timing": {"warmup": warmup, "repeats": repeats, "batch": len(contexts)}}


@contextlib.contextmanager
def quiet_lmms_bars(quiet: bool = True):
    """Silence lmms-eval's own progress bars (document building, postprocessing) while a cell
    runs; the sweep shows one labeled bar per cell instead. ``vtc sweep --verbose`` keeps them."""
    import importlib

    from tqdm import tqdm

    if not quiet:
        yield
        return

    def silent(*args, **kwargs):
        return tqdm(*args, **{**kwargs, "disable": True})

    saved = []
    for name in ("lmms_eval.evaluator", "lmms_eval.api.task", "lmms_eval.api.metrics"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "tqdm"):
            saved.append((module, module.tqdm))
            module.tqdm = silent
    try:
        yield
    finally:
        for module, original in saved:
            module.tqdm = original


def _new_folders(out: Path) -> list[Path]:
    """The folders ``out.mkdir(parents=True)`` would create, deepest first."""
    return [p for p in [out, *out.parents] if not p.exists()]


def _clean_failed(out: Path, created: list[Path], wrote_settings: bool) -> None:
    """After a run that finished no cell: remove the settings it recorded and the folders it made."""
    if read_results(out):
        return
    if wrote_settings:
        (out / SETTINGS_FILE).unlink(missing_ok=True)
    _remove_empty(created)


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders a failed run made (``_new_folders``, deepest first) while they are empty."""
    for folder in created:
        try:
            folder.rmdir()  # only if empty
        except OSError:
            break


def run(spec: SweepSpec, progress: bool = True, verbose: bool = False) -> Path:
    """Run the sweep (skipping finished cells) and write tables and plots; returns the out dir.

    Everything a user can get wrong is checked before the model loads; the output folder is
    locked while the sweep runs, and must hold results of the same settings (or none).

    Example:
        >>> run(SweepSpec(methods=["vtc_cls"], budgets=[64], limit=20, out="runs/demo"))  # doctest: +SKIP
    """
    from vtc.eval.report import write_reports

    out = Path(spec.out)
    check_writable(out)
    check_device(spec.device)
    check_attention(spec.attn)
    cells, infeasible = plan_cells(spec)
    manager = prepare_tasks(spec)
    settings = run_settings(spec)
    created = _new_folders(out)
    out.mkdir(parents=True, exist_ok=True)
    lock, wrote_settings, main = OutputLock(out / ".lock", f"a sweep into {out}"), False, _is_main_process()
    try:
        if main:  # under accelerate the other ranks answer their share; rank 0 locks and writes
            lock.acquire()
            if repair_jsonl(out / "results.jsonl") is not None:
                print(f"dropped the cut-off last line of {out / 'results.jsonl'} (its cell reruns)")
        wrote_settings = check_settings(out, settings, write=main)
        for cell, why in infeasible:
            print(f"skipping {cell.name}: {why}")
        done = {row["key"] for row in read_results(out)}
        todo = [c for c in cells if cell_key(spec, c) not in done]
        if not todo:
            print(f"all {len(cells)} cells already in {out / 'results.jsonl'}")
        wrote = bool(todo) and _run_cells(spec, manager, todo, out, progress, verbose)
        if main and not wrote:  # a written cell has already written the reports
            write_reports(out)
    except BaseException:
        lock.release()  # before the cleanup, which removes the folder only if empty
        if main:
            _clean_failed(out, created, wrote_settings)
        raise
    lock.release()
    return out


def _run_cells(spec: SweepSpec, manager, todo: list[Cell], out: Path, progress: bool, verbose: bool) -> bool:
    """Evaluate ``todo``, appending each cell's row and rewriting the reports after it; returns
    whether this process wrote any row."""
    if spec.backend == "vllm":
        from vtc.eval.served import run_cells

        return run_cells(spec, manager, todo, out, progress, verbose)
    from lmms_eval.evaluator import simple_evaluate
    from transformers.utils import logging as hf_logging

    from vtc.eval.cost import PeakMemory
    from vtc.eval.lmms_plugin import VtcLMM, process_device
    from vtc.eval.report import write_reports

    path = spec.model_path()
    kwargs = {"dtype": getattr(torch, spec.dtype)}
    if spec.attn:
        kwargs["attn_implementation"] = spec.attn
    bars = hf_logging.is_progress_bar_enabled()
    if not verbose:
        hf_logging.disable_progress_bar()  # transformers' weight-loading bar
    try:
        model = vtc.from_pretrained(path, **kwargs).to(process_device(spec.device))
        processor = vtc.load_processor(path)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    lm = VtcLMM.wrap(model, processor, batch_size=spec.batch_size)
    lm.show_progress = progress
    wrote = False
    for i, cell in enumerate(todo, 1):
        lm.costs.clear()
        lm.first_request = None
        lm.bar_label = f"cell {i}/{len(todo)} {cell.name}"
        if cell.method is not None:
            vtc.apply(model, cell.method, cell.budget, **dict(cell.params))
        start = time.time()
        try:
            with PeakMemory(process_device(spec.device)) as memory, quiet_lmms_bars(not verbose):
                results = simple_evaluate(model=lm, tasks=spec.tasks, limit=spec.limit, task_manager=manager,
                                          batch_size=spec.batch_size, log_samples=False,
                                          verbosity="INFO" if verbose else "WARNING")
                timing = time_cell(lm, spec.warmup, spec.repeats) if results is not None else {}
        finally:
            if cell.method is not None:
                vtc.remove(model)
        if results is None or not lm.accelerator.is_main_process:  # under accelerate, rank 0 writes
            continue
        row = result_row(spec, cell, results, _costs(lm.costs, memory, timing), start)
        append_jsonl(out / "results.jsonl", row)
        write_reports(out)
        wrote = True
    return wrote
