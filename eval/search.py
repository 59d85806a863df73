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
from pathlib import Path


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
