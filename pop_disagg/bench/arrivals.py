"""When requests are sent: gamma-distributed gaps, as vLLM's and SGLang's serving benchmarks draw them.

A gap is ``Gamma(shape=b, scale=1/(rate*b))``: its mean is ``1/rate`` whatever the burstiness ``b``,
and its coefficient of variation is ``1/sqrt(b)``. ``b = 1`` is the exponential gap of a Poisson
process; ``b < 1`` sends bursts separated by lulls, ``b > 1`` is smoother than Poisson. A rate of
``inf`` sends everything at once (every gap is zero).
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np


def check_arrival_settings(rate: float, burstiness: float) -> None:
    if not rate > 0:  # also rejects NaN
        raise ValueError(f"request rate must be > 0 (or inf), got {rate}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"burstiness must be a finite number > 0, got {burstiness}")


def iter_gaps(rate: float, burstiness: float, rng: np.random.Generator) -> Iterator[float]:
    """Endless gaps (seconds) between consecutive sends; the first request goes out at time 0."""
    check_arrival_settings(rate, burstiness)
    if math.isinf(rate):
        while True:
            yield 0.0
    scale = 1.0 / (rate * burstiness)
    while True:
        # Drawn in blocks: one numpy call per 256 gaps keeps the schedule cheap at high rates.
        yield from rng.gamma(shape=burstiness, scale=scale, size=256).tolist()


def arrival_gaps(num_gaps: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """``num_gaps`` gaps drawn as ``iter_gaps`` draws them (for tests and plots)."""
    gaps = iter_gaps(rate, burstiness, np.random.default_rng(seed))
    return np.fromiter((next(gaps) for _ in range(num_gaps)), dtype=np.float64, count=num_gaps)
