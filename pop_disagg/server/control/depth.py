"""Depth as a serving knob: which plan of the served family each request's prefill runs.

The router asks ``DepthController.choose`` once per prefilled request. A request that names a
``prune_ratio`` gets that plan. Otherwise the server's default plan, or, with ``--adaptive-depth
--ttft-slo-ms T``, one of two rules (docs/serving.md, "Depth as a knob"). Both start from

    predicted_ttft(plan) = queued_s(worker) + n * s_per_token(plan) + overhead_s

* ``greedy``: the mildest plan with predicted_ttft(plan) <= T; if none meets T, the deepest. It
  spends the whole slack on the request at hand, so the requests that arrive during its prefill
  find the backlog it left and are pushed deep or past T: at load it alternates between the
  extremes.
* ``lookahead`` (default): the mildest plan that meets T for this request *and* for the requests
  expected behind it if they ran the same plan. With arrival rate ``lam`` (EWMA of the gaps between
  prefilled requests) and mean prefill length ``m`` (EWMA), follower ``k`` (k = 1..K, K = ``horizon``,
  32 arrivals by default) is predicted at

      max(0, queued_s + n * s + (k - 1) * m * s - k / lam) + m * s + overhead_s

  which is linear in ``k``, so checking k = 1 and k = K is enough. A plan whose load ``lam * m * s``
  exceeds 1 fails at k = K however empty the queue is now; one below 1 fails only if the backlog is
  already large, or if the mean wait of that load in steady state (Pollaczek-Khinchine, with the
  measured variability of prompt lengths and pass times) plus a service exceeds T. So the choice tracks the load the plan would sustain, and the middle plans are
  chosen when the load sits between what they sustain. Before a rate is measured (the first
  request) the rule is ``greedy``.

``queued_s`` is the prefill work the router has handed that worker and not yet seen finish: the
sum over its outstanding tasks of ``tokens * s_per_token(their plan)`` (the worker runs them first,
FIFO, whatever this request's plan). ``s_per_token(plan)`` is an EWMA of the worker-measured
prefill time per token of the forward passes that ran that plan (``prefill_s / num_batch_tokens``);
a plan not measured yet is estimated from the measured ones through its relative FLOPs
(``plan_costs``: kept layers plus the K/V share of skipped ones). ``overhead_s`` is an EWMA of the
rest of the measured TTFT (transfer, the boundary decode step, the router). Before anything has
been measured there is no evidence of pressure and every request gets the mildest plan; as the
queue drains ``queued_s`` falls and the choice returns to the mildest plan by itself.

The counter ``pop_disagg:prefill_plan_total{ratio}`` counts the plans handed out (explicit and
chosen); every ``log_interval_s`` with traffic a log line gives the mix since the previous one.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter as Tally
from dataclasses import dataclass, field
from typing import Callable

from ...pop.plan import PlanFamily

RULES = ("lookahead", "greedy")

log = logging.getLogger("pop_disagg.serve")


def kv_share(hidden_size: int, q_size: int, kv_size: int, intermediate_size: int) -> float:
    """Fraction of a layer's weight FLOPs spent in its K/V projections (what a skipped layer still pays)."""
    attn = hidden_size * (q_size + 2 * kv_size) + q_size * hidden_size
    mlp = 3 * hidden_size * intermediate_size
    return 2 * hidden_size * kv_size / (attn + mlp)


def plan_costs(family: PlanFamily, kv_fraction: float) -> tuple[float, ...]:
    """Prefill cost of each plan relative to the full model: (kept + f * skipped) / L."""
    n = family.num_layers
    return tuple((n - len(p.skip_layers) + kv_fraction * len(p.skip_layers)) / n for p in family.plans)


@dataclass
class _Pending:
    num_tokens: int
    index: int


@dataclass
class _WorkerQueue:
    pending: dict[str, _Pending] = field(default_factory=dict)  # request id -> outstanding prefill


class DepthController:
    """Plan choice, queue model and the plan-mix metric. Plain Python; the router calls it from
    its event loop (no locking needed)."""

    def __init__(
        self,
        family: PlanFamily,
        num_prefill: int,
        costs: tuple[float, ...],
        ttft_slo_s: float | None = None,
        adaptive: bool = False,
        registry=None,
        clock: Callable[[], float] = time.monotonic,
        ewma_alpha: float = 0.3,
        log_interval_s: float = 10.0,
        rule: str = "lookahead",
        horizon: int = 32,
    ):
        from prometheus_client import CollectorRegistry, Counter

        if adaptive and ttft_slo_s is None:
            raise ValueError("adaptive depth needs a TTFT SLO (--ttft-slo-ms)")
        if rule not in RULES:
            raise ValueError(f"unknown depth rule {rule!r} (known: {', '.join(RULES)})")
        if len(costs) != len(family.plans):
            raise ValueError(f"need one cost per plan, got {len(costs)} for {len(family.plans)} plans")
        self.family, self.costs = family, costs
        self.ttft_slo_s, self.adaptive = ttft_slo_s, adaptive
        self.clock, self.alpha, self.log_interval_s = clock, ewma_alpha, log_interval_s
        self.rule = rule
        self.horizon = horizon
        # The traffic the lookahead rule plans for: EWMAs of the gap between prefilled requests
        # and of their prefill lengths, updated by every choice (explicit plans included).
        self.mean_gap_s: float | None = None
        self.mean_tokens: float | None = None
        self.tokens_cv2 = 0.0  # EWMA of (tokens / mean - 1)^2
        self.time_cv2 = 0.0  # EWMA of (measured s_per_token / its EWMA - 1)^2, all plans
        self._last_arrival: float | None = None
        self.queues = [_WorkerQueue() for _ in range(num_prefill)]
        self.s_per_token: list[float | None] = [None] * len(family.plans)  # measured EWMA per plan
        self.overhead_s = 0.0
        self._has_overhead = False
        self.default_index = family.index_of(family.default_ratio)
        # Registered in the registry passed in (the server's, once it has one) or a fresh one.
        self.registry = registry if registry is not None else CollectorRegistry()
        self.plan_total = Counter(
            "pop_disagg:prefill_plan",
            "Requests prefilled per plan of the served family",
            ["ratio"],
            registry=self.registry,
        )
        for name in family.names:
            self.plan_total.labels(ratio=name)  # every plan shows, even at zero
        self._mix: Tally[int] = Tally()
        self._last_log = clock()

    # ---- the model ----------------------------------------------------------------------------
    def seconds_per_token(self, index: int) -> float | None:
        """Measured EWMA for this plan, else scaled from the measured plan nearest in cost."""
        if self.s_per_token[index] is not None:
            return self.s_per_token[index]
        measured = [i for i, s in enumerate(self.s_per_token) if s is not None]
        if not measured:
            return None
        ref = min(measured, key=lambda i: abs(self.costs[i] - self.costs[index]))
        return self.s_per_token[ref] * self.costs[index] / self.costs[ref]

    def queued_s(self, worker: int) -> float:
        total = 0.0
        for task in self.queues[worker].pending.values():
            s = self.seconds_per_token(task.index)
            total += task.num_tokens * (s or 0.0)
        return total

    def predicted_ttft_s(self, worker: int, num_tokens: int, index: int) -> float | None:
        s = self.seconds_per_token(index)
        if s is None:
            return None
        return self.queued_s(worker) + num_tokens * s + self.overhead_s

    # ---- the decision -------------------------------------------------------------------------
    def choose(self, worker: int | None, num_tokens: int, requested_index: int | None = None) -> int:
        """Index into the family of the plan for a request of ``num_tokens`` prefill tokens bound
        for prefill worker ``worker`` (None: colocated, the engine's own plan); ``requested_index``
        is the plan the request's ``prune_ratio`` named, resolved at the edge (``ModelLimits.plan_index``)."""
        self._observe_arrival(num_tokens)
        if requested_index is not None:
            index = requested_index
        elif not self.adaptive or worker is None:
            index = self.default_index
        else:
            index = self._adaptive_choice(worker, num_tokens)
        self.plan_total.labels(ratio=self.family.names[index]).inc()
        self._mix[index] += 1
        self._maybe_log()
        return index

    def _adaptive_choice(self, worker: int, num_tokens: int) -> int:
        for i in range(len(self.family.plans)):  # mildest first
            predicted = self.predicted_ttft_s(worker, num_tokens, i)
            if predicted is None or (predicted <= self.ttft_slo_s and self._followers_meet_slo(worker, num_tokens, i)):
                return i
        return len(self.family.plans) - 1  # nothing meets the SLO: the fastest plan hurts least

    def _followers_meet_slo(self, worker: int, num_tokens: int, index: int) -> bool:
        """Lookahead: would the requests expected behind this one still meet T on the same plan?"""
        if self.rule == "greedy" or self.mean_gap_s is None or self.mean_gap_s <= 0 or math.isinf(self.ttft_slo_s):
            return True
        s = self.seconds_per_token(index) or 0.0
        # The router spreads arrivals over the workers: this worker sees one every gap * W seconds.
        gap, m = self.mean_gap_s * len(self.queues), self.mean_tokens
        horizon = self.horizon
        backlog = self.queued_s(worker) + num_tokens * s
        for k in {1, horizon}:
            ahead = max(0.0, backlog + (k - 1) * m * s - k * gap)
            if ahead + m * s + self.overhead_s > self.ttft_slo_s:
                return False
        # The same load in steady state, with its randomness: the mean wait of a queue with Poisson
        # arrivals (Pollaczek-Khinchine), service time m * s with the squared coefficient of
        # variation measured from prompt lengths and per-token times.
        rho = m * s / gap
        if rho >= 1.0:
            return False
        cv2 = (1 + self.tokens_cv2) * (1 + self.time_cv2) - 1
        wait = rho * m * s * (1 + cv2) / (2 * (1 - rho))
        return wait + m * s + self.overhead_s <= self.ttft_slo_s

    def _observe_arrival(self, num_tokens: int) -> None:
        now = self.clock()
        if self._last_arrival is not None:
            gap = now - self._last_arrival
            self.mean_gap_s = gap if self.mean_gap_s is None else (1 - self.alpha) * self.mean_gap_s + self.alpha * gap
        self._last_arrival = now
        t = float(num_tokens)
        if self.mean_tokens is None:
            self.mean_tokens = t
        else:
            self.tokens_cv2 = (1 - self.alpha) * self.tokens_cv2 + self.alpha * (t / self.mean_tokens - 1) ** 2
            self.mean_tokens = (1 - self.alpha) * self.mean_tokens + self.alpha * t

    # ---- what the router reports --------------------------------------------------------------
    def on_submit(self, worker: int, request_id: str, num_tokens: int, index: int) -> None:
        self.queues[worker].pending[request_id] = _Pending(num_tokens, index)

    def on_done(self, worker: int, request_id: str, prefill_s: float | None = None, num_batch_tokens: int = 0) -> None:
        """The task left the worker (sent, failed or aborted); with a measurement, learn from it."""
        task = self.queues[worker].pending.pop(request_id, None)
        if task is not None and prefill_s and num_batch_tokens > 0:
            self._ewma_plan(task.index, prefill_s / num_batch_tokens)

    def observe_ttft(self, ttft_s: float, queue_s: float, prefill_s: float) -> None:
        """What a finished request's TTFT spent outside the prefill worker's queue and pass."""
        rest = max(0.0, ttft_s - queue_s - prefill_s)
        self.overhead_s = rest if not self._has_overhead else (1 - self.alpha) * self.overhead_s + self.alpha * rest
        self._has_overhead = True

    def _ewma_plan(self, index: int, value: float) -> None:
        old = self.s_per_token[index]
        if old is not None:
            self.time_cv2 = (1 - self.alpha) * self.time_cv2 + self.alpha * (value / old - 1) ** 2
        self.s_per_token[index] = value if old is None else (1 - self.alpha) * old + self.alpha * value

    def _maybe_log(self) -> None:
        now = self.clock()
        if now - self._last_log < self.log_interval_s or len(self.family.plans) == 1:
            return  # one plan: nothing to report that the stats line does not say
        total = sum(self._mix.values())
        mix = ", ".join(f"{name} {self._mix[i] / total:.0%}" for i, name in enumerate(self.family.names))
        queued = ", ".join(f"{self.queued_s(w) * 1e3:.0f}" for w in range(len(self.queues)))
        slo = f"SLO {self.ttft_slo_s * 1e3:.0f} ms, adaptive" if self.adaptive else "fixed default"
        log.info(
            "prefill depth mix over %.0fs (%d requests, %s): %s; queued prefill ms per worker: %s",
            now - self._last_log,
            total,
            slo,
            mix,
            queued,
        )
        self._mix.clear()
        self._last_log = now
