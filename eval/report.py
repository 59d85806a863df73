"""Tables and plots from a sweep's ``results.jsonl``: the unreduced model is the reference."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def _rows(out: Path) -> list[dict]:
    from vtc.eval.sweep import read_results

    return read_results(out)


def main_metric(metrics: dict) -> str:
    """The metric a task is judged by: its first reported one."""
    return next(iter(metrics))


def table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """Header and rows of the summary (one row per cell, the full model first)."""
    tasks = sorted({t for r in rows for t in r["metrics"]})
    full = next((r for r in rows if r["config"]["method"] is None), None)
    header = ["cell", "method", "budget", "tokens entering LLM", "equivalent tokens", "prefill GFLOPs",
              "FLOPs vs full", "prefill ms/sample", "speedup", "TTFT ms", "KV cache KB/sample", "peak memory MB"]
    for t in tasks:
        header += [f"{t} {main_metric(rows[0]['metrics'][t]) if t in rows[0]['metrics'] else ''}".strip(),
                   f"{t} vs full"]
    header += ["prefill ms/sample min-max", "TTFT ms min-max", "timed repeats"]  # after the older columns
    body = []
    order = sorted(rows, key=lambda r: (r["config"]["method"] is not None, r["config"]["method"] or "",
                                        -(r["costs"]["equivalent_tokens"] or 0)))
    for r in order:
        c, cfg = r["costs"], r["config"]
        ref = full["costs"] if full else None
        line = [r["cell"], cfg["method"] or "full", cfg["budget"] if cfg["budget"] is not None else "",
                _f(c["tokens_entering_llm"], 0), _f(c["equivalent_tokens"], 1), _f(_div(c["flops"], 1e9), 4),
                _pct(_div(c["flops"], ref["flops"]) if ref else None), _f(_mul(c["prefill_s_per_sample"], 1e3), 2),
                _x(_speedup(ref, c) if ref else None),
                _f(_mul(c["ttft_s"], 1e3), 1), _f(_div(c["kv_cache_bytes"], 1024), 1),
                _f(_div(c["peak_memory_bytes"], 2**20), 0)]
        for t in tasks:
            m = r["metrics"].get(t, {})
            value = m.get(main_metric(m)) if m else None
            base = full["metrics"].get(t, {}).get(main_metric(m)) if full and m else None
            line += [_f(value, 4), _pct(_div(value, base))]
        line += [_range(c.get("prefill_s_per_sample_min"), c.get("prefill_s_per_sample_max"), 2),
                 _range(c.get("ttft_s_min"), c.get("ttft_s_max"), 1), (c.get("timing") or {}).get("repeats", "")]
        body.append(line)
    return header, body


def _speedup(ref: dict, costs: dict) -> float | None:
    """The full model's prefill time per sample over a cell's, both measured the same way: the
    timed repeats when both rows have them, else the evaluation pass (rows written before the
    repeats existed have only that)."""
    if ref.get("timing") and costs.get("timing"):
        return _div(ref["prefill_s_per_sample"], costs["prefill_s_per_sample"])

    def evaluated(c):
        return c.get("prefill_s_per_sample_eval", c["prefill_s_per_sample"])

    return _div(evaluated(ref), evaluated(costs))


def _range(lo, hi, digits):
    """``"1.20-1.45"`` in milliseconds from seconds (blank for rows timed in one pass)."""
    return "" if lo is None or hi is None else f"{lo * 1e3:.{digits}f}-{hi * 1e3:.{digits}f}"


def _div(a, b):
    return a / b if a is not None and b else None


def _mul(a, b):
    return a * b if a is not None else None


def _f(v, digits):
    return "" if v is None else f"{v:.{digits}f}"


def _pct(v):
    return "" if v is None else f"{v:.1%}"


def _x(v):
    return "" if v is None else f"{v:.2f}x"


def pivot(rows: list[dict]) -> list[str]:
    """Markdown lines: one row per method, one column per budget, cells ``accuracy (FLOPs %)``
    of each task's main metric; the full model's row first. Unreachable cells are blank.

    Example:
        >>> pivot([{"config": {"method": None, "budget": None}, "metrics": {"t": {"acc": 1.0}},
        ...         "costs": {"flops": 2.0}}])[2]
        '| full | 1.000 (100%) |'
    """
    tasks = sorted({t for r in rows for t in r["metrics"]})
    full = next((r for r in rows if r["config"]["method"] is None), None)
    budgets = sorted({r["config"]["budget"] for r in rows if r["config"]["budget"] is not None}, reverse=True)
    methods = sorted({r["config"]["method"] for r in rows if r["config"]["method"]})
    by = {(r["config"]["method"], r["config"]["budget"]): r for r in rows}
    lines = []
    for task in tasks:
        head = ["method"] + ([f"budget {b:g}" for b in budgets] or ["full"])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

        def cell(r, task=task):
            if r is None or task not in r["metrics"]:
                return ""
            m = r["metrics"][task]
            ratio = r["costs"]["flops"] / full["costs"]["flops"] if full and r["costs"].get("flops") else 1.0
            return f"{m[main_metric(m)]:.3f} ({ratio:.0%})"

        if full:
            lines.append("| full | " + " | ".join([cell(full)] * max(1, len(budgets))) + " |")
        for method in methods:
            if budgets and any((method, b) in by for b in budgets):
                lines.append("| " + " | ".join([method] + [cell(by.get((method, b))) for b in budgets]) + " |")
        # Methods without a budget (schedules) get a row each, with their equivalent tokens.
        for r in rows:
            if r["config"]["method"] and r["config"]["budget"] is None and task in r["metrics"]:
                tokens = r["costs"].get("equivalent_tokens") or 0
                blank = [""] * max(0, len(budgets) - 1)
                lines.append(f"| {r['cell']}, {tokens:.1f} tokens | " + " | ".join([cell(r), *blank]) + " |")
    return lines


def write_reports(out: str | Path) -> None:
    """Write ``summary.md``, ``summary.csv``, ``accuracy_vs_budget.png``, ``accuracy_vs_flops.png``."""
    out = Path(out)
    rows = _rows(out)
    if not rows:
        return
    header, body = table(rows)
    with (out / "summary.csv").open("w", newline="") as f:
        csv.writer(f).writerows([header, *body])
    cfg = rows[-1]["config"]
    lines = [f"# Sweep: {cfg['model']} on {', '.join(cfg['tasks'])}", "",
             f"{len(rows)} cells; limit {cfg['limit']}, batch {cfg['batch_size']}, {cfg['device']}, {cfg['dtype']}, "
             f"attention {cfg['attn'] or 'default'}; versions {json.dumps(rows[-1]['versions'])}."]
    timing = rows[-1]["costs"].get("timing")
    if timing:
        lines += ["", f"Times: medians of {timing['repeats']} timed `generate` calls per cell after {timing['warmup']} "
                  f"warm-up (prefill per sample on a batch of {timing['batch']}; TTFT of one sample alone), "
                  f"min-max beside them; peak memory: the cell's peak above what was in use when it began "
                  f"({rows[-1]['costs'].get('memory_measure', '')})."]
    lines += ["", "Main metric by method and budget (analytic prefill FLOPs against the full model):", ""]
    lines += pivot(rows)
    lines += ["", "Every cell:", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in line) + " |" for line in body]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    plot(rows, out)


def plot(rows: list[dict], out: Path) -> None:
    """Accuracy against equivalent tokens and against FLOPs, one line per method, the full
    model dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for r in rows for t in r["metrics"]})
    full = next((r for r in rows if r["config"]["method"] is None), None)
    methods = sorted({r["config"]["method"] for r in rows if r["config"]["method"]})
    for name, xkey, xlabel in [("accuracy_vs_budget", "equivalent_tokens", "equivalent visual tokens per image"),
                               ("accuracy_vs_flops", "flops", "prefill GFLOPs per sequence (analytic)")]:
        fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks) + 2, 4.2), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for i, method in enumerate(methods):
                pts = sorted((r["costs"][xkey], r["metrics"][task][main_metric(r["metrics"][task])])
                             for r in rows if r["config"]["method"] == method and task in r["metrics"])
                if pts:
                    xs = [p[0] / (1e9 if xkey == "flops" else 1) for p in pts]
                    # A color and a marker per method, so a dozen lines stay apart.
                    ax.plot(xs, [p[1] for p in pts], marker="osD^vPX*"[i % 8], color=plt.cm.tab20(i % 20),
                            label=method)
            if full and task in full["metrics"]:
                m = full["metrics"][task]
                ax.axhline(m[main_metric(m)], color="black", linestyle="--", label="full model")
            metric = main_metric(rows[0]["metrics"][task]) if task in rows[0]["metrics"] else "score"
            ax.set(title=task, xlabel=xlabel, ylabel=metric)
            ax.grid(alpha=0.3)
            ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
        model = rows[-1]["config"]["model"]
        fig.suptitle(f"{model}: {name.replace('_', ' ')}", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=120)
        plt.close(fig)
