"""Timing helpers shared by the speed figures: interleaved rounds, so that engines compared side by side
see the same machine load (the benchmark machine is shared), and plain summary statistics."""

from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

import numpy as np


def interleaved(engines: dict[str, Callable[[object], object]],
                batches: Sequence[object] | Mapping[str, Sequence[object]], *, rounds: int,
                seconds_per_round: float, min_batches: int = 2, warmup: int = 2) -> dict[str, list[float]]:
    """Run each engine over `batches` (cycling; a mapping gives each engine its own) for about
    `seconds_per_round` and at least `min_batches` calls per round, engines taking turns round by round.
    Returns the seconds of every timed call, per engine."""
    own = {name: list(batches[name] if isinstance(batches, Mapping) else batches) for name in engines}
    for name, fn in engines.items():
        for b in own[name][:warmup]:
            fn(b)
    times: dict[str, list[float]] = {name: [] for name in engines}
    pos = {name: warmup for name in engines}
    for _ in range(rounds):
        for name, fn in engines.items():
            spent, n = 0.0, 0
            while spent < seconds_per_round or n < min_batches:
                b = own[name][pos[name] % len(own[name])]
                pos[name] += 1
                t0 = time.perf_counter()
                fn(b)
                dt = time.perf_counter() - t0
                times[name].append(dt)
                spent += dt
                n += 1
    return times


def summary(seconds: Sequence[float], items_per_call: float) -> dict:
    a = np.asarray(seconds, dtype=np.float64)
    return {
        "calls": int(a.size),
        "ms_per_batch_p50": float(np.percentile(a, 50) * 1000),
        "ms_per_batch_p90": float(np.percentile(a, 90) * 1000),
        "ms_per_batch_mean": float(a.mean() * 1000),
        "texts_per_s": float(items_per_call * a.size / a.sum()),
    }


def percentiles(seconds: Sequence[float]) -> dict:
    a = np.asarray(seconds, dtype=np.float64) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "max_ms": float(a.max())}
