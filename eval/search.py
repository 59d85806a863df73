"""Searched per-layer budgets: the G-Search walk and P-Sigmoid's Bayesian optimization.

The searches only need a ``metric(counts) -> float`` callback (higher is better), so the same
code runs against a real evaluation or a stub in tests.

Example:
    >>> counts, evals = gsearch(lambda c: -sum(c) / 1e9, num_layers=4, tokens=8, tolerance=1.0)
    >>> counts
    [8, 0, 0, 0]
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import vtc
from vtc.budget import resolve_count
from vtc.errors import VtcError
from vtc.eval.store import OutputLock, append_jsonl, check_out_file, model_fingerprint, read_jsonl, repair_jsonl
from vtc.registry import get_adapter


def gsearch(
    metric: Callable[[list[int]], float],
    num_layers: int,
    tokens: int,
    tolerance: float,
    reference: float | None = None,
    progress: Callable[[int, list[int]], None] | None = None,
) -> tuple[list[int], int]:
    """G-Search (Zhao et al., CVPR 2025, Scenario I): layer 0 keeps all ``tokens``; for each
    later layer ``l``, the fewest tokens ``n_l <= n_(l-1)`` such that the schedule
    ``(n_0..n_l, then n_l for every deeper layer)`` keeps ``metric`` within ``tolerance`` of
    the unreduced ``reference``. Assuming the metric never falls when a layer keeps more
    (the essential tokens never grow with depth), each layer is a binary search: at most
    ``1 + (L - 1) ceil(log2(tokens + 1))`` evaluations. Returns ``(counts, evaluations)``.

    Example:
        >>> need = [8, 6, 6, 3]  # a stub whose metric holds while every layer keeps its need
        >>> ok = lambda c: -float(any(x < y for x, y in zip(c, need)))
        >>> gsearch(ok, 4, 8, tolerance=0.5)[0]
        [8, 6, 6, 3]
    """
    evaluations = 0

    def run(counts: list[int]) -> float:
        nonlocal evaluations
        evaluations += 1
        return metric(counts)

    ref = run([tokens] * num_layers) if reference is None else reference
    counts = [tokens]
    for layer in range(1, num_layers):
        lo, hi = 0, counts[-1]  # hi always satisfies the tolerance
        while lo < hi:
            mid = (lo + hi) // 2
            if run(counts + [mid] * (num_layers - layer)) >= ref - tolerance:
                hi = mid
            else:
                lo = mid + 1
        counts.append(hi)
        if progress:
            progress(layer, counts)
    return counts, evaluations


def write_schedule(path: str | Path, counts: list[int], tokens: int, **record) -> Path:
    """Save a schedule file that ``vtc.apply(model, "schedule", schedule=path)`` applies."""
    from vtc.eval.sweep import versions

    path = Path(path)
    data = {"num_layers": len(counts), "image_tokens": tokens, "counts": counts,
            "fractions": [c / tokens for c in counts], **record, "versions": versions()}
    path.write_text(json.dumps(data, indent=2))
    return path


CALIB_SEED = 2718  # the toy calibration questions: neither training's nor the documented evaluation's
STEPS = 3  # answer tokens the KL metric teacher-forces


@dataclass
class SearchSpec:
    """What ``vtc search`` runs; each field is a flag."""

    algorithm: str  # "gsearch" or "psigmoid"
    model: str = "toy"
    calib: str = "toy_vqa"  # the toy questions natively, or any lmms-eval task
    limit: int = 64
    metric: str = "kl"
    tolerance: float = 0.01
    budget: int | float | None = None
    trials: int = 20
    out: str = "schedule.json"
    seed: int = 0
    batch_size: int = 16
    device: str = "cpu"

    def check(self) -> None:
        """Refuse settings a search cannot run with, one line each, before any model loads.

        Example:
            >>> SearchSpec("gsearch", tolerance=float("nan")).check()
            Traceback (most recent call last):
            ...
            vtc.errors.VtcError: --tolerance nan: use a finite number >= 0 (the metric loss allowed)
        """
        from vtc.eval.sweep import _budget, _count, check_device

        if self.algorithm not in ("gsearch", "psigmoid"):
            raise VtcError(f"unknown search {self.algorithm!r}: use gsearch or psigmoid")
        if self.metric not in ("kl", "accuracy"):
            raise VtcError(f"unknown metric {self.metric!r}: use kl (label-free) or accuracy")
        if self.algorithm == "psigmoid" and self.budget is None:
            raise VtcError("psigmoid searches the best schedule at a budget: pass --budget")
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) or \
                not math.isfinite(self.tolerance) or self.tolerance < 0:
            raise VtcError(f"--tolerance {self.tolerance}: use a finite number >= 0 (the metric loss allowed)")
        for flag, value in (("--limit", self.limit), ("--trials", self.trials), ("--batch-size", self.batch_size)):
            try:
                _count(value, flag)
            except VtcError:
                raise VtcError(f"{flag} {value}: use an integer >= 1") from None
        if self.budget is not None:
            self.budget = _budget(self.budget)
        check_device(self.device)
        check_out_file(self.out, "schedule file", "schedule.json")

    def model_path(self) -> str:
        from vtc.eval.sweep import model_path

        return model_path(self.model)

    def settings(self) -> dict:
        """Everything that changes the value of one evaluation (not the tolerance, which only
        chooses the schedules evaluated): the journal of evaluations is keyed by it.

        Example:
            >>> SearchSpec("gsearch", model="org/vlm").settings()["metric"]
            'kl'
        """
        return {"model": self.model, "model_fingerprint": model_fingerprint(self.model_path()),
                "calib": self.calib, "calib_seed": CALIB_SEED, "limit": self.limit, "metric": self.metric,
                "batch_size": self.batch_size, "device": self.device, "steps": STEPS}

    def key(self) -> str:
        return hashlib.sha1(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()[:16]


def psigmoid_range(tokens: int, num_layers: int) -> tuple[float, float]:
    """The budgets P-Sigmoid can meet: layer 0 keeps every token, so the layer average is at
    least ``tokens / num_layers``.

    Example:
        >>> psigmoid_range(144, 8)
        (18.0, 144)
    """
    return tokens / num_layers, tokens


def fit_budget(counts: list[int], budget_tokens: float) -> list[int]:
    """Lower the deepest layers' counts (keeping them non-increasing) until the layer average is
    at most ``budget_tokens``: rounding each layer must not put a schedule over its budget.

    Example:
        >>> fit_budget([16, 9, 8, 8], 10.0)
        [16, 8, 8, 8]
    """
    counts = list(counts)
    while sum(counts) > budget_tokens * len(counts) + 1e-9:
        # The last layer among those holding the largest count after layer 0.
        top = max(counts[1:])
        if top == 0:
            break
        i = max(i for i in range(1, len(counts)) if counts[i] == top)
        counts[i] -= 1
    return counts


class Calibration:
    """Scores a per-layer schedule against the unreduced model on calibration questions.

    ``metric="accuracy"``: exact match of the greedy answers. ``metric="kl"``: minus the mean
    KL divergence from the unreduced model's next-token distributions to the reduced one's,
    teacher-forced along the unreduced model's greedy answer (prefill, then each answer token
    through the cache, as generation runs). Higher is better for both.

    Example:
        >>> calib = Calibration(model, processor, toy.generate(64, seed=2718), "kl")  # doctest: +SKIP
        >>> calib([144] * 8)                                                          # doctest: +SKIP
        -0.0
    """

    def __init__(self, model, processor, records, metric: str, batch_size: int = 16, steps: int = 3,
                 accuracy: Callable[[], float] | None = None) -> None:
        from vtc.eval import toy

        self.model, self.processor, self.records, self.metric = model, processor, records, metric
        self.accuracy = accuracy  # for records without answers (an lmms-eval task scores itself)
        self.steps, self.batch_size = steps, batch_size
        self.batches = []
        tok = processor.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        try:
            for start in range(0, len(records), batch_size):
                batch = records[start : start + batch_size]
                inputs = processor(images=[r.image for r in batch], text=[toy.prompt(processor, r.question)
                                                                          for r in batch],
                                   padding=True, return_tensors="pt").to(model.device)
                self.batches.append(inputs)
        finally:
            tok.padding_side = side
        self.reference = [self._teacher_forced(inputs, None) for inputs in self.batches]

    @torch.no_grad()
    def _teacher_forced(self, inputs, answer: torch.Tensor | None):
        """Log-probabilities at each answer step; the greedy answer when ``answer`` is None."""
        mask = inputs["attention_mask"]
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        out = self.model(**inputs, position_ids=pos, use_cache=True)
        logps, tokens, cache = [out.logits[:, -1].float().log_softmax(-1)], [], out.cache
        for t in range(self.steps - 1):
            nxt = logps[-1].argmax(-1) if answer is None else answer[:, t]
            tokens.append(nxt)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos[:, -1:] + 1
            out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=cache,
                             use_cache=True)
            logps.append(out.logits[:, -1].float().log_softmax(-1))
            cache = out.cache
        tokens.append(logps[-1].argmax(-1))
        return torch.stack(logps, dim=1), torch.stack(tokens, dim=1)

    def __call__(self, counts: list[int]) -> float:
        from vtc.eval import toy

        with vtc.compressed(self.model, "schedule", schedule={"counts": list(counts)}):
            if self.metric == "accuracy":
                if self.accuracy is not None:
                    return self.accuracy()
                preds = toy.answer(self.model, self.processor, self.records, batch_size=self.batch_size)
                return toy.score(self.records, preds)["overall"]
            kl, n = 0.0, 0
            for inputs, (ref_logp, ref_tokens) in zip(self.batches, self.reference):
                logp, _ = self._teacher_forced(inputs, ref_tokens)
                kl += float((ref_logp.exp() * (ref_logp - logp)).sum(-1).sum())
                n += ref_logp.shape[0] * ref_logp.shape[1]
            return -kl / n


def lmms_task_calibration(task: str, limit: int, model, processor, batch_size: int):
    """Calibration questions from an lmms-eval task's documents (first image and prompt of each),
    and a function scoring the model on the same ``limit`` documents with the task's own metric."""
    from types import SimpleNamespace

    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager, get_task_dict

    from vtc.eval.lmms_plugin import VtcLMM
    from vtc.eval.report import main_metric
    from vtc.eval.sweep import SweepSpec, prepare_tasks

    manager = prepare_tasks(SweepSpec(tasks=[task])) if task == "toy_vqa" else TaskManager()
    if task not in manager.all_tasks:
        raise VtcError(f"unknown lmms-eval task {task!r} for calibration")
    task_obj = get_task_dict([task], manager)[task]
    docs = task_obj.test_docs() if task_obj.has_test_docs() else task_obj.validation_docs()
    records = []
    for doc in list(docs)[:limit]:
        visuals = task_obj.doc_to_visual(doc)
        if visuals:
            records.append(SimpleNamespace(image=visuals[0], question=task_obj.doc_to_text(doc)))
    lm = VtcLMM.wrap(model, processor, batch_size=batch_size)

    def accuracy() -> float:
        out = simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=manager, batch_size=batch_size,
                              log_samples=False, verbosity="WARNING")
        metrics = {k.split(",")[0]: v for k, v in out["results"][task].items() if isinstance(v, (int, float))}
        metrics = {k: v for k, v in metrics.items() if "stderr" not in k}
        return float(metrics[main_metric(metrics)])

    return records, accuracy


def _journal(path: Path, key: str) -> dict[str, float]:
    """Finished evaluations of a G-Search under the same settings (``key``), so that a rerun skips
    them; a cut-off last line (a crash mid-write) is dropped first, and its evaluation reruns."""
    if repair_jsonl(path) is not None:
        print(f"dropped the cut-off last line of {path} (that evaluation reruns)")
    return {json.dumps(row["counts"]): row["value"] for row in read_jsonl(path)
            if row.get("key") == key and "counts" in row and "value" in row}


def _model_info(spec: SearchSpec):
    """The model's token count and layer count from its config (no weights)."""
    from vtc.eval.sweep import _meta_model

    return get_adapter(_meta_model(spec.model_path())).info()


def _check_budget(spec: SearchSpec, info) -> float:
    """P-Sigmoid's budget in tokens, refused (with the feasible range) when it cannot be met."""
    lo, hi = psigmoid_range(info.image_tokens, info.num_layers)
    try:
        tokens = resolve_count(spec.budget, info.image_tokens)
    except VtcError as e:
        raise VtcError(f"{e}; psigmoid budgets on this model: {lo:g} to {hi} tokens") from None
    if tokens < lo - 1e-9:
        raise VtcError(f"psigmoid --budget {spec.budget}: layer 0 keeps all {hi} tokens, so a schedule averages at "
                       f"least {lo:g} tokens over {info.num_layers} layers; pass a budget from {lo:g} to {hi}")
    return tokens


def run_search(spec: SearchSpec) -> Path:
    """Run G-Search or P-Sigmoid on the calibration set and write the schedule file.

    Settings are checked before the model loads; the schedule file is locked while the search
    runs; evaluations and trials are journaled beside it, keyed by the settings they depend on.

    Example:
        >>> run_search(SearchSpec("gsearch", limit=16, out="g.json"))  # doctest: +SKIP
    """
    spec.check()
    info = _model_info(spec)
    budget_tokens = _check_budget(spec, info) if spec.algorithm == "psigmoid" else None
    from vtc.eval.sweep import _new_folders, _remove_empty

    out = Path(spec.out)
    created = _new_folders(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with OutputLock(out.with_name(out.name + ".lock"), f"a search into {out}"):
            return _search(spec, out, budget_tokens)
    except BaseException:
        _remove_empty(created)  # a failed search leaves no empty folders
        raise


def _search(spec: SearchSpec, out: Path, budget_tokens: float | None) -> Path:
    from vtc.eval import toy

    path = spec.model_path()
    model = vtc.from_pretrained(path).to(spec.device)
    processor = vtc.load_processor(path)
    info = get_adapter(model).info()
    n, num = info.image_tokens, info.num_layers
    if spec.calib == "toy_vqa":
        calib = Calibration(model, processor, toy.generate(spec.limit, seed=CALIB_SEED), spec.metric, spec.batch_size,
                            steps=STEPS)
    else:
        records, accuracy = lmms_task_calibration(spec.calib, spec.limit, model, processor, spec.batch_size)
        calib = Calibration(model, processor, records, spec.metric, spec.batch_size, steps=STEPS, accuracy=accuracy)
    record = {"model": spec.model, "algorithm": spec.algorithm, "calib": spec.calib, "limit": spec.limit,
              "metric": spec.metric, "seed": spec.seed}
    reference = calib([n] * num)
    if spec.algorithm == "gsearch":
        counts, extra = _gsearch(spec, out, calib, n, num, reference)
    else:
        counts, extra = _psigmoid(spec, out, calib, n, num, budget_tokens)
    record.update(reference=reference, **extra)
    return write_schedule(out, counts, n, **record)


def _gsearch(spec: SearchSpec, out: Path, calib, n: int, num: int, reference: float) -> tuple[list[int], dict]:
    journal, key = out.with_suffix(".evals.jsonl"), spec.key()
    done = _journal(journal, key)

    def metric(counts):
        k = json.dumps(list(counts))
        if k not in done:
            done[k] = calib(counts)
            append_jsonl(journal, {"key": key, "counts": list(counts), "value": done[k]})
        return done[k]

    def progress(layer, counts):
        print(f"layer {layer}/{num - 1}: keep {counts[-1]} ({len(done)} evaluations)", flush=True)

    counts, evaluations = gsearch(metric, num, n, spec.tolerance, reference, progress)
    return counts, {"tolerance": spec.tolerance, "evaluations": evaluations,
                    "value": metric(counts + [counts[-1]] * (num - len(counts)))}


def _psigmoid(spec: SearchSpec, out: Path, calib, n: int, num: int, budget_tokens: float) -> tuple[list[int], dict]:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from vtc.methods.psigmoid import psigmoid_counts

    fraction = budget_tokens / n
    storage = JournalStorage(JournalFileBackend(str(out.with_suffix(".optuna.journal"))))
    name = f"psigmoid-{fraction:.4f}-{spec.key()}"  # a study per budget and settings
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
    # A resumed study must not replay the first run's draws: the sampler's seed moves on with
    # the trials already there.
    study.sampler = optuna.samplers.GPSampler(seed=spec.seed + len(study.trials))

    def schedule(r_min, slope):
        return fit_budget(psigmoid_counts(num, n, r_min, slope, fraction), budget_tokens)

    def objective(trial):
        # Layer 0 keeps everything, so the floor must leave room for the average to meet the budget.
        r_min = trial.suggest_float("r_min", 0.0, 0.9 * max(0.0, (num * fraction - 1) / (num - 1)))
        slope = trial.suggest_float("slope", 0.05, 4.0, log=True)
        return calib(schedule(r_min, slope))

    finished = len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE])
    study.optimize(objective, n_trials=max(0, spec.trials - finished), show_progress_bar=True)
    best = study.best_params
    counts = schedule(best["r_min"], best["slope"])
    return counts, {"budget": spec.budget, "trials": spec.trials, "params": best, "value": study.best_value}
