"""Cost meters: prefill latency (interleaved medians) and peak memory.

Absolute times on shared CPUs are noisy; compare ratios measured in one run, with the
configurations interleaved round by round so that drift hits all of them alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (synchronizing CUDA if it is in use).

    Example:
        >>> timed(lambda: sum(range(10))) >= 0
        True
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 1,
                        progress: Callable[[int], None] | None = None, timer: bool = True) -> dict[str, float]:
    """Median seconds of each function, the functions run in turn within every round.

    With ``timer=False`` each function times itself and returns its seconds (so it can
    set up and tear down outside the timed region).

    Example:
        >>> sorted(interleaved_medians({"a": lambda: None, "b": lambda: None}, rounds=2))
        ['a', 'b']
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            samples[name].append(timed(fn) if timer else float(fn()))
        if progress:
            progress(r + 1)
    return {name: statistics.median(s) for name, s in samples.items()}


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by tensors while ``fn`` runs, above what was live before it.

    On CUDA: the caching allocator's peak. On CPU: replayed from the profiler's allocation
    and free records (so run it apart from timing: profiling slows the call).

    Example:
        >>> peak_memory_bytes(lambda: torch.empty(1024, 1024)) >= 4 * 1024 * 1024
        True
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = []
    for e in prof.events():
        # Frees are recorded as "[memory]" events; allocations on the op that made them.
        amount = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if amount:
            changes.append((e.time_range.start, amount))
    live = peak = 0
    for _, amount in sorted(changes):
        live += amount
        peak = max(peak, live)
    return peak
