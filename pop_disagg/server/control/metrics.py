"""Prometheus metrics of one server: the series, what updates them, and the ``/metrics`` endpoint.

Names follow vLLM's (``vllm:...`` -> ``pop_disagg:...``) so its Grafana boards port over. Every
``ServerMetrics`` owns a ``CollectorRegistry`` of its own (several servers can live in one process,
as in the tests); the HTTP front end serves the same ``registry`` on its own ``/metrics``.

What counts when (the router's observer calls ``admitted``, ``tokens``, ``finished``, ``failed``):
- ``num_requests_waiting``: admitted, no token yet (queued for blocks, prefilling, KV in transit);
  ``num_requests_running``: producing tokens. Both drop when the request ends, however it ends.
- ``request_success_total{finished_reason}``: requests that finished (``stop``, ``length``,
  ``abort``); ``request_failure_total{code}``: requests that ended with a gRPC error, by status
  name, including refusals (admission, auth, bad input: the servicer calls ``count_failure``).
- ``prompt_tokens_total`` when a request's first token comes back, ``generation_tokens_total`` for
  every token handed to the client.
- histograms: TTFT at the first token; E2E latency, TPOT (``(last - first token) / (tokens - 1)``,
  the per-request mean) and the KV transfer time (prefill end -> KV written on the decode worker)
  for finished requests; ``kv_transfer_bytes_total`` is the K/V payload of finished transfers (the
  uncached suffix of each prefix: what the decode worker's prefix cache held did not move).
- ``kv_blocks_free`` / ``kv_blocks_total{worker}``: set by the server's poll of the decode workers
  (free counts evictable prefix-cache blocks: an allocation can take them).
- ``num_preemptions_total``, ``prefix_cache_queries_total`` / ``prefix_cache_hits_total`` (tokens
  looked up at admission / found cached): the decode workers' engine counters, advanced by the
  same poll (``set_engine_counters``; a replaced worker starts again from zero).
- ``worker_restarts_total{role}``: ``count_worker_restart`` (called by whoever restarts a worker).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ..errors import ServingError

PREFIX = "pop_disagg:"
FINISH_REASONS = ("stop", "length", "abort")
# Codes a client of this server can see; listed up front so every series exists before traffic.
FAILURE_CODES = (
    "INVALID_ARGUMENT",
    "RESOURCE_EXHAUSTED",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "CANCELLED",
    "UNAUTHENTICATED",
    "INTERNAL",
)
ROLES = ("prefill", "decode")

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
)
TPOT_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def status_name(exc: BaseException) -> str:
    """The gRPC status a front end answers for ``exc`` (the same table as the servicer's)."""
    import asyncio

    if isinstance(exc, ValueError):
        return "INVALID_ARGUMENT"
    if isinstance(exc, ServingError):
        return exc.grpc_code
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"  # the client went away or cancelled
    return "INTERNAL"


@dataclass
class _Live:
    """What the metrics remember about a request in flight (perf_counter seconds)."""

    num_prompt_tokens: int
    arrival: float
    first_token: float | None = None
    last_token: float | None = None
    num_output_tokens: int = 0


class ServerMetrics:
    def __init__(self, is_disaggregated: bool = True, kv_bytes_per_token: int = 0):
        self.is_disaggregated = is_disaggregated
        self.kv_bytes_per_token = kv_bytes_per_token  # set by the server once the model is known
        self.registry = r = CollectorRegistry()
        self._live: dict[str, _Live] = {}
        self._lock = threading.Lock()  # the HTTP front end may run on another thread
        self._http = None
        self.num_running = Gauge(PREFIX + "num_requests_running", "Requests producing tokens.", registry=r)
        self.num_waiting = Gauge(
            PREFIX + "num_requests_waiting",
            "Admitted requests with no token yet (queued, prefilling, KV in transit).",
            registry=r,
        )
        self.success = Counter(
            PREFIX + "request_success", "Finished requests by finish reason.", ["finished_reason"], registry=r
        )
        self.failure = Counter(
            PREFIX + "request_failure", "Requests that ended with an error, by gRPC status name.", ["code"], registry=r
        )
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens of requests that produced a first token.", registry=r
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Generated tokens handed to clients.", registry=r
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds", "Arrival to first token.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            PREFIX + "time_per_output_token_seconds",
            "Per finished request: (last - first token) / (tokens - 1).",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Arrival to the end of a finished request.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.kv_transfer = Histogram(
            PREFIX + "kv_transfer_seconds",
            "Prefill end to K/V of every layer written on the decode worker.",
            buckets=TRANSFER_BUCKETS,
            registry=r,
        )
        self.kv_transfer_bytes = Counter(
            PREFIX + "kv_transfer_bytes",
            "K/V payload bytes moved from prefill to decode workers (finished requests).",
            registry=r,
        )
        self.kv_blocks_free = Gauge(
            PREFIX + "kv_blocks_free", "Free KV blocks per decode worker.", ["worker"], registry=r
        )
        self.kv_blocks_total = Gauge(PREFIX + "kv_blocks_total", "KV blocks per decode worker.", ["worker"], registry=r)
        self.worker_restarts = Counter(PREFIX + "worker_restarts", "Worker restarts by role.", ["role"], registry=r)
        self.num_preemptions = Counter(
            PREFIX + "num_preemptions", "Running requests preempted for KV blocks (recomputed later).", registry=r
        )
        self.prefix_cache_queries = Counter(
            PREFIX + "prefix_cache_queries", "Tokens of admitted requests looked up in the prefix cache.", registry=r
        )
        self.prefix_cache_hits = Counter(
            PREFIX + "prefix_cache_hits", "Tokens of admitted requests found in the prefix cache.", registry=r
        )
        self._engine_counters: dict[str, dict[str, int]] = {}  # worker -> last values polled
        for reason in FINISH_REASONS:
            self.success.labels(reason)
        for code in FAILURE_CODES:
            self.failure.labels(code)
        for role in ROLES:
            self.worker_restarts.labels(role)

    # ---- the router's observer -----------------------------------------------------------------
    def admitted(self, request_id: str, num_prompt_tokens: int) -> None:
        with self._lock:
            self._live[request_id] = _Live(num_prompt_tokens, time.perf_counter())
        self.num_waiting.inc()

    def tokens(self, request_id: str, num_new: int) -> None:
        now = time.perf_counter()
        with self._lock:
            live = self._live.get(request_id)
            if live is None:
                return
            is_first = live.first_token is None
            if is_first:
                live.first_token = now
            live.last_token = now
            live.num_output_tokens += num_new
        if is_first:
            self.num_waiting.dec()
            self.num_running.inc()
            self.prompt_tokens.inc(live.num_prompt_tokens)
            self.ttft.observe(now - live.arrival)
        self.generation_tokens.inc(num_new)

    def finished(
        self, request_id: str, finish_reason: str, transfer_s: float | None, num_transferred_tokens: int | None = None
    ) -> None:
        """``num_transferred_tokens``: prefix tokens whose K/V crossed a link (the uncached suffix)."""
        live = self._end(request_id)
        if live is None:
            return
        self.success.labels(finish_reason).inc()
        self.e2e.observe(time.perf_counter() - live.arrival)
        if live.num_output_tokens > 1:
            self.tpot.observe((live.last_token - live.first_token) / (live.num_output_tokens - 1))
        if self.is_disaggregated and num_transferred_tokens:
            # The uncached part of the prefix x_1..x_{N-1} moved (the decode worker held the rest).
            self.kv_transfer_bytes.inc(num_transferred_tokens * self.kv_bytes_per_token)
            if transfer_s is not None:
                self.kv_transfer.observe(transfer_s)

    def failed(self, request_id: str | None, exc: BaseException) -> None:
        """``request_id`` None: refused before admission. A request that already ended is not counted twice."""
        if request_id is not None and self._end(request_id) is None:
            return
        self.count_failure(status_name(exc))

    def _end(self, request_id: str) -> _Live | None:
        with self._lock:
            live = self._live.pop(request_id, None)
        if live is not None:
            (self.num_waiting if live.first_token is None else self.num_running).dec()
        return live

    # ---- called by the rest of the server ------------------------------------------------------
    def count_failure(self, code: str) -> None:
        """A request refused or failed outside the router (bad input, auth), by gRPC status name."""
        self.failure.labels(code).inc()

    def count_worker_restart(self, role: str) -> None:
        self.worker_restarts.labels(role).inc()

    def set_kv_blocks(self, worker: str, num_free: int, num_total: int) -> None:
        self.kv_blocks_free.labels(worker).set(num_free)
        self.kv_blocks_total.labels(worker).set(num_total)

    def set_engine_counters(self, worker: str, counters: dict[str, int]) -> None:
        """Advance the engine counters by what ``worker`` counted since the last poll (its stats:
        ``num_preemptions``, ``prefix_cache_queries``, ``prefix_cache_hits``, cumulative)."""
        last = self._engine_counters.get(worker, {})
        for name, counter in (
            ("num_preemptions", self.num_preemptions),
            ("prefix_cache_queries", self.prefix_cache_queries),
            ("prefix_cache_hits", self.prefix_cache_hits),
        ):
            value = counters.get(name, 0)
            before = last.get(name, 0)
            counter.inc(value - before if value >= before else value)  # lower: a new worker counts from 0
        self._engine_counters[worker] = dict(counters)

    # ---- /metrics ------------------------------------------------------------------------------
    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` (Prometheus text) from a daemon thread; returns the bound port."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop_serving(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
