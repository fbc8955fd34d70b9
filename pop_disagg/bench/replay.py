"""Deterministic replay of the depth controller: a disaggregated server in virtual time.

The same arrival trace is served once per mode (each fixed plan of the family, and the adaptive
rules) by a model of the server whose costs were measured on a real one (``CostModel``: prefill
seconds per token for each plan plus a per-pass constant, transfer per token, decode step seconds
by batch size). What runs is the real ``DepthController`` (``server/control/depth.py``) on a
simulated clock, fed exactly what the router feeds it (``choose`` per request, ``on_submit``,
``on_done`` with the pass's measured time and tokens, ``observe_ttft``); what is modelled is the
rest: each prefill worker steps as ``disagg/prefill_worker.py`` does (every waiting task up to the
token budget in one step, one pass per plan, mildest first, a pass's tasks done when it ends; the
router's least-queued pick among workers), the transfer is ``fixed + per_token * n``, and the decode worker steps its running set
back to back, a request joining at the next step after its K/V arrive (its boundary token's step
yields its first token). No model runs, so a sweep over thousands of requests takes seconds and
has no machine noise; ``noise_cv`` adds seeded lognormal noise to service times to test that the
ranking is not an artefact of exact costs.
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..pop.plan import PlanFamily
from ..server.control.depth import DepthController, plan_costs
from .arrivals import arrival_gaps


@dataclass(frozen=True)
class CostModel:
    """Measured costs of one server configuration (``benchmarks/depth_profile.py`` writes them)."""

    ratios: tuple[float, ...]  # the family's ratios, mildest first
    num_layers: int
    prefill_s_per_token: tuple[float, ...]  # per plan
    prefill_pass_s: float  # fixed cost of one prefill pass, any plan
    transfer_fixed_s: float
    transfer_s_per_token: float
    decode_batches: tuple[int, ...]  # batch sizes the decode step was timed at
    decode_step_s: tuple[float, ...]  # seconds of one decode step at each of those batches
    quality: tuple[float, ...]  # quality cost of each plan: perplexity / full (fidelity table)
    source: str = ""  # how the numbers were measured (machine, command)

    def decode_s(self, batch: int) -> float:
        return float(np.interp(batch, self.decode_batches, self.decode_step_s))

    def prefill_s(self, index: int, num_tokens: int) -> float:
        return self.prefill_pass_s + num_tokens * self.prefill_s_per_token[index]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        raw = json.loads(Path(path).read_text())
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


@dataclass(frozen=True)
class Arrival:
    time_s: float
    num_prompt_tokens: int
    num_output_tokens: int


def poisson_trace(
    rate: float,
    num_requests: int,
    input_len: int,
    output_len: int,
    seed: int = 0,
    input_sigma: float = 0.0,
    burstiness: float = 1.0,
) -> list[Arrival]:
    """Arrivals drawn as the load generator draws them (``bench/arrivals.py``: gamma gaps, Poisson at
    ``burstiness`` 1); prompt lengths fixed, or lognormal around ``input_len`` with ``input_sigma``."""
    times = np.concatenate([[0.0], np.cumsum(arrival_gaps(num_requests - 1, rate, burstiness, seed))])
    rng = np.random.default_rng(seed + 1)
    lens = (
        np.full(num_requests, input_len)
        if input_sigma <= 0
        else np.maximum(2, np.round(input_len * rng.lognormal(0, input_sigma, num_requests)))
    )
    return [Arrival(float(t), int(n), output_len) for t, n in zip(times, lens)]


@dataclass
class Served:
    arrival: Arrival
    index: int  # the plan the request's prefill ran
    queue_s: float = 0.0
    prefill_s: float = 0.0
    ttft_s: float = math.inf
    finish_s: float = math.inf


@dataclass
class ModeResult:
    mode: str
    served: list[Served]
    slo_s: float
    quality: tuple[float, ...]
    summary: dict = field(default_factory=dict)

    def __post_init__(self):
        ttft = np.array([s.ttft_s for s in self.served])
        good = int((ttft <= self.slo_s).sum())
        span = max(s.finish_s for s in self.served) - min(s.arrival.time_s for s in self.served)
        mix = np.bincount([s.index for s in self.served], minlength=len(self.quality))
        self.summary = {
            "mode": self.mode,
            "goodput": good / span,
            "slo_attainment": good / len(self.served),
            "ttft_p50_ms": float(np.percentile(ttft, 50) * 1e3),
            "ttft_p99_ms": float(np.percentile(ttft, 99) * 1e3),
            "quality_cost": float(np.mean([self.quality[s.index] for s in self.served])),
            "mix": [int(c) for c in mix],
        }


def replay(
    trace: list[Arrival],
    costs: CostModel,
    mode: str,
    slo_s: float,
    num_prefill: int = 1,
    noise_cv: float = 0.0,
    seed: int = 0,
    max_num_batched_tokens: int = 8192,
) -> ModeResult:
    """Serve ``trace`` in virtual time. ``mode``: a ratio of the family as text ("0.2", a fixed plan
    asked for by every request), or an adaptive rule ("lookahead", "greedy")."""
    family = PlanFamily.from_ratios(costs.num_layers, list(costs.ratios), default_ratio=costs.ratios[0])
    fixed = None if mode in ("lookahead", "greedy") else family.index_of(float(mode))
    if fixed is None and mode not in ("lookahead", "greedy"):
        raise ValueError(f"mode {mode!r} is neither a family ratio ({family.names}) nor a rule")
    now = [0.0]
    # The relative FLOPs only seed plans not yet measured; a warm server has measured all of them.
    ctl = DepthController(
        family,
        num_prefill,
        plan_costs(family, 0.0),
        ttft_slo_s=slo_s,
        adaptive=fixed is None,
        clock=lambda: now[0],
        rule=mode if fixed is None else "lookahead",
        log_interval_s=math.inf,
    )
    for i in range(len(family.plans)):  # warm: what the controller learned from earlier traffic
        ctl.s_per_token[i] = costs.prefill_s_per_token[i]
    rng = np.random.default_rng(seed)

    def noisy(t: float) -> float:
        return (
            t
            if noise_cv <= 0
            else t * float(rng.lognormal(-0.5 * math.log1p(noise_cv**2), math.sqrt(math.log1p(noise_cv**2))))
        )

    events: list[tuple[float, int, str, int]] = []  # (time, seq, kind, request or worker)
    seq = [0]

    def push(t: float, kind: str, who: int) -> None:
        seq[0] += 1
        heapq.heappush(events, (t, seq[0], kind, who))

    served: list[Served] = []
    queues: list[list[int]] = [[] for _ in range(num_prefill)]
    busy = [False] * num_prefill
    decode_waiting: list[int] = []  # K/V arrived, boundary step not yet run
    running: dict[int, int] = {}  # request -> tokens still to generate
    decode_busy = [False]
    for i, a in enumerate(trace):
        push(a.time_s, "arrive", i)

    def start_prefill(w: int) -> None:
        # As the prefill worker steps (disagg/prefill_worker.py): every waiting task up to the token
        # budget in one step, one pass per plan, mildest first; a pass's tasks leave when it ends.
        if busy[w] or not queues[w]:
            return
        taken, tokens = [], 0
        while queues[w]:
            n = served[queues[w][0]].arrival.num_prompt_tokens - 1
            if taken and tokens + n > max_num_batched_tokens:
                break
            taken.append(queues[w].pop(0))
            tokens += n
        t = now[0]
        for index in sorted({served[r].index for r in taken}):
            group = [r for r in taken if served[r].index == index]
            n = sum(served[r].arrival.num_prompt_tokens - 1 for r in group)
            pass_s = noisy(costs.prefill_s(index, n))
            t += pass_s
            for r in group:
                served[r].queue_s = now[0] - served[r].arrival.time_s
                served[r].prefill_s = t - now[0]
                measured[r] = (pass_s, n)
                push(t, "prefilled", r)
        busy[w] = True
        push(t, "free", w)

    def start_decode_step() -> None:
        if decode_busy[0] or not (running or decode_waiting):
            return
        batch = list(running) + decode_waiting
        for r in decode_waiting:
            running[r] = trace[r].num_output_tokens
        decode_waiting.clear()
        decode_busy[0] = True
        step = noisy(costs.decode_s(len(batch)))
        push(now[0] + step, "step", len(batch))

    worker_of: dict[int, int] = {}
    measured: dict[int, tuple[float, int]] = {}  # request -> (its pass's seconds, the pass's tokens)
    while events:
        now[0], _, kind, who = heapq.heappop(events)
        if kind == "arrive":
            n = trace[who].num_prompt_tokens - 1
            w = min(range(num_prefill), key=lambda j: (ctl.queued_s(j), j))
            index = ctl.choose(w, n, fixed)
            ctl.on_submit(w, str(who), n, index)
            served.append(Served(trace[who], index))
            worker_of[who] = w
            queues[w].append(who)
            start_prefill(w)
        elif kind == "free":
            busy[who] = False
            start_prefill(who)
        elif kind == "prefilled":
            w, s = worker_of[who], served[who]
            pass_s, batch_tokens = measured[who]
            ctl.on_done(w, str(who), prefill_s=pass_s, num_batch_tokens=batch_tokens)
            n = s.arrival.num_prompt_tokens - 1
            push(now[0] + noisy(costs.transfer_fixed_s + costs.transfer_s_per_token * n), "kv", who)
        elif kind == "kv":
            decode_waiting.append(who)
            start_decode_step()
        elif kind == "step":
            decode_busy[0] = False
            for r in list(running):
                s = served[r]
                if math.isinf(s.ttft_s):
                    s.ttft_s = now[0] - s.arrival.time_s
                    ctl.observe_ttft(s.ttft_s, s.queue_s, s.prefill_s)
                running[r] -= 1
                if running[r] == 0:
                    s.finish_s = now[0]
                    del running[r]
            start_decode_step()
    return ModeResult(mode, served, slo_s, costs.quality)


def pareto_check(results: list[ModeResult], controller: str = "lookahead") -> tuple[bool, str]:
    """The acceptance rule at one rate: if some fixed plan misses the SLO for some requests, the
    controller's goodput is at least that of the best fixed plan whose quality cost is no worse
    than the controller's. Returns (holds, a sentence saying why)."""
    rules = {"lookahead", "greedy"}
    fixed = [r.summary for r in results if r.mode not in rules]
    ctl = next(r.summary for r in results if r.mode == controller)
    if all(f["slo_attainment"] >= 1.0 for f in fixed):
        return True, "every fixed plan meets the SLO for all requests (nothing to choose)"
    eligible = [f for f in fixed if f["quality_cost"] <= ctl["quality_cost"] + 1e-9]
    if not eligible:
        return True, f"no fixed plan is as mild as the controller (x{ctl['quality_cost']:.3f})"
    best = max(eligible, key=lambda f: f["goodput"])
    ok = ctl["goodput"] >= best["goodput"] - 1e-9
    return ok, (
        f"{controller} {ctl['goodput']:.3f} req/s at x{ctl['quality_cost']:.3f} vs best fixed at no worse "
        f"quality ({best['mode']}) {best['goodput']:.3f} req/s at x{best['quality_cost']:.3f}"
    )
