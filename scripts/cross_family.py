#!/usr/bin/env python
"""The cross-family table of docs/results.md: the same methods and budgets on the LLaVA-1.5-format toy
and the Qwen2.5-VL-format toy, side by side, from two ``vtc sweep`` folders (scripts/cross_family.sh).

Each cell reads ``accuracy (analytic prefill FLOPs against the full model)``; a method that does not
apply to a family, or a budget it cannot reach there, reads ``n/a`` with the sweep's reason below the
table. With ``--write``, the block between ``<!-- cross-family:start -->`` and ``<!-- cross-family:end -->``
of docs/results.md is replaced; otherwise the table is printed.

Example:
    .venv/bin/python scripts/cross_family.py runs/cross-family/llava runs/cross-family/qwen --write
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import vtc
from vtc.eval import sweep

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- cross-family:start (written by scripts/cross_family.py) -->", "<!-- cross-family:end -->"
FAMILIES = (("LLaVA-1.5 toy", "toy"), ("Qwen2.5-VL toy", "toy-qwen"))


def _rows(out: Path) -> dict[tuple[str | None, float | None], dict]:
    """``{(method, budget): row}`` of a sweep folder (the full model under ``(None, None)``)."""
    rows = {}
    for row in sweep.read_results(out):
        cfg = row["config"]
        rows[(cfg["method"], cfg["budget"])] = row
    return rows


def _accuracy(row: dict) -> float:
    (metrics,) = row["metrics"].values()  # one task: toy_vqa
    return metrics["exact_match"]


def _cell(row: dict | None) -> str:
    if row is None:
        return "n/a"
    flops = row["costs"]["flops"] / row["costs"]["flops_full"]
    return f"{_accuracy(row):.3f} ({flops:.0%})"


def _skipped(out: Path, methods: list[str], budgets: list[float]) -> dict[tuple[str, float], str]:
    """Why the sweep of ``out`` skipped each (method, budget) it could not run (``plan_cells``)."""
    settings = json.loads((out / "settings.json").read_text())
    spec = sweep.SweepSpec(model=settings["model"], methods=methods, budgets=budgets, out=str(out), device="cpu")
    _, infeasible = sweep.plan_cells(spec)
    return {(cell.method, cell.budget): why for cell, why in infeasible}


def table(outs: list[Path], methods: list[str], budgets: list[float]) -> str:
    """The markdown table (methods x budgets, the families side by side in each budget) and its notes."""
    rows = [_rows(out) for out in outs]
    reasons = [_skipped(out, methods, budgets) for out in outs]
    names = [name for name, _ in FAMILIES]
    head = ["method"] + [f"{b:.3g}: {n}" for b in budgets for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| full | " + " | ".join(_cell(r.get((None, None))) for _ in budgets for r in rows) + " |")
    notes: dict[str, str] = {}
    for method in methods:
        cells = []
        for budget in budgets:
            for name, r, why in zip(names, rows, reasons, strict=True):
                row = r.get((method, budget))
                cells.append(_cell(row))
                if row is None and (method, budget) in why:
                    notes.setdefault(f"{method} on the {name}", why[(method, budget)])
        if any(c != "n/a" for c in cells):
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Why a cell is n/a (the sweep's reasons; a fraction of the tokens is checked on the plan's reference "
                 "image, 1,024 tokens on Qwen2.5-VL, and every image keeps the same fraction):")
    lines.append("")
    for where, why in notes.items():
        lines.append(f"* n/a, {where}: {why}")
    return "\n".join(lines)


def write(path: Path, text: str) -> None:
    doc = path.read_text()
    start, end = doc.find(START), doc.find(END)
    if start < 0 or end < 0:
        raise SystemExit(f"{path} has no {START} ... {END} block")
    path.write_text(doc[: start + len(START)] + "\n\n" + text + "\n\n" + doc[end:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("llava", type=Path, help="the LLaVA toy's sweep folder")
    p.add_argument("qwen", type=Path, help="the Qwen toy's sweep folder")
    p.add_argument("--methods", default=None, help="comma-separated (default: every standalone method)")
    p.add_argument("--budgets", default="0.3333333,0.2222222,0.1111111")
    p.add_argument("--write", action="store_true", help="replace the block of docs/results.md")
    args = p.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    methods = args.methods.split(",") if args.methods else vtc.list_methods(standalone=True, images=True)
    text = table([args.llava, args.qwen], methods, budgets)
    if args.write:
        write(ROOT / "docs" / "results.md", text)
    print(text)


if __name__ == "__main__":
    main()
