"""Wall-clock timing for measurements on a shared machine: the best of N runs, the least disturbed one."""

from __future__ import annotations

import time
from typing import Any, Callable


def best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """The least wall time of ``repeats`` calls of ``fn``, which must wait for its own work (jax: block on it);
    warm it up first where the first call compiles."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
