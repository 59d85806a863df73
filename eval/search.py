"""Searched per-layer budgets: the G-Search walk and P-Sigmoid's Bayesian optimization.

The searches only need a ``metric(counts) -> float`` callback (higher is better), so the same
code runs against a real evaluation or a stub in tests.

Example:
    >>> counts, evals = gsearch(lambda c: -sum(c) / 1e9, num_layers=4, tokens=8, tolerance=1.0)
    >>> counts
    [8, 0, 0, 0]
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import vtc
from vtc.budget import resolve_count
from vtc.errors import VtcError
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
        if self.algorithm not in ("gsearch", "psigmoid"):
            raise VtcError(f"unknown search {self.algorithm!r}: use gsearch or psigmoid")
        if self.metric not in ("kl", "accuracy"):
            raise VtcError(f"unknown metric {self.metric!r}: use kl (label-free) or accuracy")
        if self.algorithm == "psigmoid" and self.budget is None:
            raise VtcError("psigmoid searches the best schedule at a budget: pass --budget")


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


def _journal(path: Path) -> dict[str, float]:
    """Finished evaluations of a G-Search, so that a rerun skips them."""
    if not path.is_file():
        return {}
    done = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            done[json.dumps(row["counts"])] = row["value"]
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut by a kill
    return done


def run_search(spec: SearchSpec) -> Path:
    """Run G-Search or P-Sigmoid on the calibration set and write the schedule file."""
    from vtc.eval import toy
    from vtc.methods.psigmoid import psigmoid_counts

    spec.check()
    path = toy.MODEL_PATH if spec.model == "toy" else spec.model
    model = vtc.from_pretrained(str(path)).to(spec.device)
    processor = vtc.load_processor(str(path))
    info = get_adapter(model).info()
    n, num = info.image_tokens, info.num_layers
    if spec.calib == "toy_vqa":
        calib = Calibration(model, processor, toy.generate(spec.limit, seed=CALIB_SEED), spec.metric, spec.batch_size)
    else:
        records, accuracy = lmms_task_calibration(spec.calib, spec.limit, model, processor, spec.batch_size)
        calib = Calibration(model, processor, records, spec.metric, spec.batch_size, accuracy=accuracy)
    out = Path(spec.out)
    record = {"model": spec.model, "algorithm": spec.algorithm, "calib": spec.calib, "limit": spec.limit,
              "metric": spec.metric, "seed": spec.seed}
    reference = calib([n] * num)
    if spec.algorithm == "gsearch":
        journal = out.with_suffix(".evals.jsonl")
        done = _journal(journal)

        def metric(counts):
            key = json.dumps(list(counts))
            if key not in done:
                done[key] = calib(counts)
                with journal.open("a") as f:
                    f.write(json.dumps({"counts": list(counts), "value": done[key]}) + "\n")
            return done[key]

        def progress(layer, counts):
            print(f"layer {layer}/{num - 1}: keep {counts[-1]} ({len(done)} evaluations)", flush=True)

        counts, evaluations = gsearch(metric, num, n, spec.tolerance, reference, progress)
        record.update(tolerance=spec.tolerance, evaluations=evaluations, reference=reference,
                      value=metric(counts + [counts[-1]] * (num - len(counts))))
    else:
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        fraction = resolve_count(spec.budget, n) / n
        storage = JournalStorage(JournalFileBackend(str(out.with_suffix(".optuna.journal"))))
        study = optuna.create_study(study_name=f"psigmoid-{fraction:.4f}", storage=storage, direction="maximize",
                                    sampler=optuna.samplers.GPSampler(seed=spec.seed), load_if_exists=True)

        def schedule(r_min, slope):
            return psigmoid_counts(num, n, r_min, slope, fraction)

        def objective(trial):
            # Layer 0 keeps everything, so the floor must leave room for the average to meet the budget.
            r_min = trial.suggest_float("r_min", 0.0, 0.9 * max(0.0, (num * fraction - 1) / (num - 1)))
            slope = trial.suggest_float("slope", 0.05, 4.0, log=True)
            return calib(schedule(r_min, slope))

        finished = len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE])
        study.optimize(objective, n_trials=max(0, spec.trials - finished), show_progress_bar=True)
        best = study.best_params
        counts = schedule(best["r_min"], best["slope"])
        record.update(budget=spec.budget, trials=spec.trials, params=best, reference=reference,
                      value=study.best_value)
    return write_schedule(out, counts, n, **record)
