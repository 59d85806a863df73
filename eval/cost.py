"""Cost meters: prefill latency (interleaved medians, repeat spreads) and peak memory.

Absolute times on shared CPUs are noisy; compare ratios measured in one run, with the
configurations interleaved round by round so that drift hits all of them alike.
"""

from __future__ import annotations

import contextlib
import ctypes
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

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


def spread(samples: list[float]) -> tuple[float, float, float]:
    """``(median, min, max)`` of repeated measurements.

    Example:
        >>> spread([3.0, 1.0, 2.0, 10.0])
        (2.5, 1.0, 10.0)
    """
    return statistics.median(samples), min(samples), max(samples)


def _status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in bytes (Linux), None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Give freed heap back to the system and reset the kernel's peak RSS (``VmHWM``) to the
    current RSS; False where that is not possible (not Linux, or no permission)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


class PeakMemory:
    """The peak memory of one stretch of work above what was in use when it began.

    GPU (``cuda``): the caching allocator's peak of tensor bytes (``reset_peak_memory_stats`` at
    the start). CPU on Linux: the process's resident memory, its kernel-kept peak (``VmHWM``)
    reset at the start (after returning freed heap to the system), so everything the work
    touched counts (tensors, Python objects, the dataset's images), with no profiler and no
    tracemalloc. Elsewhere: the process's lifetime peak (``how`` says which).

    Example:
        >>> with PeakMemory("cpu") as m:
        ...     x = torch.ones(4096, 1024)  # 16 MiB
        >>> m.peak_bytes >= 16 * 2**20 or m.how != "rss"
        True
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.base_bytes = self.peak_bytes = 0
        self.how = ""

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base_bytes, self.how = torch.cuda.memory_allocated(), "cuda allocator"
        elif _reset_rss_peak():
            self.base_bytes, self.how = _status_kb("VmRSS") or 0, "rss"
        else:
            self.base_bytes, self.how = 0, "process peak rss"
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self.base_bytes
        elif self.how == "rss":
            self.peak_bytes = max(0, (_status_kb("VmHWM") or 0) - self.base_bytes)
        else:
            self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
