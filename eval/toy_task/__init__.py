"""The toy benchmark as an lmms-eval task, ``toy_vqa``, offline.

:func:`prepare` writes the questions (a fixed seed, never used in training) as a local
``datasets`` dataset and the task's YAML into a folder that lmms-eval reads with
``--include_path``. Scoring is exact match on the first word, overall and per question kind.

Example:
    >>> path = prepare("/tmp/vtc-toy-task", n=8)            # doctest: +SKIP
    >>> # lmms-eval --model vtc --tasks toy_vqa --include_path /tmp/vtc-toy-task
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

TASK = "toy_vqa"
# Each toy task and the sizes (px, square) its images take turns with: ``toy_vqa_sizes`` varies the
# tokens per image on a model of any resolution (the Qwen2.5-VL toy: 144 and 256); the LLaVA toy
# crops every image to 168 px, so only ``toy_vqa`` is meant for it.
TASKS: dict[str, tuple[int, ...]] = {"toy_vqa": (168,), "toy_vqa_sizes": (168, 224)}
DEFAULT_N = 500


def default_dir(task: str = TASK) -> Path:
    """Where the task is prepared unless told otherwise (``$VTC_CACHE`` or ``~/.cache/vtc``)."""
    return Path(os.environ.get("VTC_CACHE", Path.home() / ".cache" / "vtc")) / task


def _yaml(dataset: Path, task: str = TASK) -> str:
    kinds = ["color", "shape", "presence"]
    metrics = [("exact_match", "aggregate_all")] + [(f"{k}_exact_match", f"aggregate_{k}") for k in kinds]
    lines = [
        f"dataset_path: {json.dumps(str(dataset))}",
        "dataset_kwargs:",
        "  load_from_disk: true",
        f"task: {task}",
        "test_split: test",
        "output_type: generate_until",
        "doc_to_visual: !function utils.doc_to_visual",
        "doc_to_text: !function utils.doc_to_text",
        'doc_to_target: "answer"',
        "generation_kwargs:",
        "  max_new_tokens: 3",
        "  temperature: 0",
        "  do_sample: false",
        "process_results: !function utils.process_results",
        "metric_list:",
    ]
    for name, agg in metrics:
        lines += [f"  - metric: {name}", f"    aggregation: !function utils.{agg}", "    higher_is_better: true"]
    lines += ["metadata:", "  - version: 1.0"]
    return "\n".join(lines) + "\n"


def prepare(path: str | Path | None = None, n: int = DEFAULT_N, seed: int | None = None, task: str = TASK) -> Path:
    """Write the dataset and YAML of ``task`` (a key of :data:`TASKS`) under ``path`` (once per
    ``n``/``seed``); returns ``path``.

    Example:
        >>> prepare(n=500)                                      # doctest: +SKIP
        PosixPath('/root/.cache/vtc/toy_vqa')
    """
    import datasets

    from vtc.eval import toy

    if task not in TASKS:
        raise ValueError(f"unknown toy task {task!r}; the toy tasks are {', '.join(TASKS)}")
    seed = toy.EVAL_SEED if seed is None else seed
    path = Path(path) if path is not None else default_dir(task)
    stamp = path / "prepared.json"
    wanted = {"n": n, "seed": seed, "version": 1, **({"task": task} if task != TASK else {})}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return path
    path.mkdir(parents=True, exist_ok=True)
    records = toy.generate(n, seed=seed, sizes=TASKS[task])
    features = datasets.Features({
        "question_id": datasets.Value("int32"),
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "kind": datasets.Value("string"),
    })
    data = datasets.Dataset.from_dict(
        {
            "question_id": list(range(n)),
            "image": [r.image for r in records],
            "question": [r.question for r in records],
            "answer": [r.answer for r in records],
            "kind": [r.kind for r in records],
        },
        features=features,
    )
    target = path / "data"
    if target.exists():
        shutil.rmtree(target)
    datasets.DatasetDict({"test": data}).save_to_disk(str(target))
    shutil.copy(Path(__file__).with_name("utils.py"), path / "utils.py")
    (path / f"{task}.yaml").write_text(_yaml(target, task))
    stamp.write_text(json.dumps(wanted))
    return path
