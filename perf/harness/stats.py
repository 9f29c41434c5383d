"""Exact percentiles of raw latency samples, and the spread of figures over repetitions."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

#: The percentiles every result reports (p50, p90, p99, p99.9) plus max.
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
#: Figure names in report order.
FIGURES = ("p50", "p90", "p99", "p99.9", "max", "throughput", "cpu_client_us", "cpu_server_us")
#: Figures where lower is better (the rest: higher is better).
LOWER_IS_BETTER = frozenset(FIGURES) - {"throughput"}

Samples = npt.NDArray[np.int64]


def as_samples(values: list[int] | Samples) -> Samples:
    return np.asarray(values, dtype=np.int64)


@dataclass
class RunResult:
    """One repetition of one workload on one system: raw samples (ns) and counters."""

    samples: Samples
    elapsed_s: float
    ops: int  # operations (requests or deliveries) in the measured phase
    cpu_client_s: float
    cpu_server_s: float | None  # None: the server's processes are not visible here
    extra: dict[str, Any] = field(default_factory=dict)

    def figures(self) -> dict[str, float | None]:
        """Latencies in microseconds, throughput in ops/s, CPU in us per op."""
        out: dict[str, float | None] = {}
        if len(self.samples):
            pct = np.percentile(self.samples, PERCENTILES, method="higher") / 1000.0
            for name, value in zip(("p50", "p90", "p99", "p99.9"), pct, strict=True):
                out[name] = float(value)
            out["max"] = float(self.samples.max()) / 1000.0
        else:
            for name in ("p50", "p90", "p99", "p99.9", "max"):
                out[name] = None
        ops = max(self.ops, 1)
        out["throughput"] = self.ops / self.elapsed_s if self.elapsed_s > 0 else None
        out["cpu_client_us"] = self.cpu_client_s * 1e6 / ops
        out["cpu_server_us"] = None if self.cpu_server_s is None else self.cpu_server_s * 1e6 / ops
        return out


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    def to_json(self) -> dict[str, float]:
        return {"median": self.median, "min": self.low, "max": self.high}


def spread(values: list[float | None]) -> Spread | None:
    """Median and min..max of one figure over the repetitions (None values skipped)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return Spread(statistics.median(present), min(present), max(present))


def summarize(runs: list[RunResult]) -> dict[str, Spread | None]:
    per_run = [r.figures() for r in runs]
    return {name: spread([f[name] for f in per_run]) for name in FIGURES}


def percentile_curve(samples: Samples, points: int = 200) -> tuple[list[float], list[float]]:
    """(percentile, latency us) pairs from p0 to the max, denser towards the tail."""
    if not len(samples):
        return [], []
    # x = 1 - 10**-k for k in 0..5 (up to p99.999), evenly in k.
    ks = np.linspace(0.0, 5.0, points)
    pct = 100.0 * (1.0 - 10.0**-ks)
    pct = pct[pct <= 100.0 * (1.0 - 1.0 / len(samples))]
    lat = np.percentile(samples, pct, method="higher") / 1000.0
    return [float(p) for p in pct], [float(v) for v in lat]
