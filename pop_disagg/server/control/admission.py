"""Admission control: which requests the server takes on, and draining before shutdown.

A request is refused at once, before any model work, when
1. the server is draining (``Draining`` -> ``UNAVAILABLE``);
2. its prompt plus ``max_new_tokens`` could never fit one decode worker's KV cache (a ``ValueError``
   naming the numbers -> ``INVALID_ARGUMENT``): it could never finish. Blocks are taken on demand
   (a decode worker holds the prompt's at admission and grows, preempting when it runs out,
   ``engine/scheduler.py``), so this is the only check by ``max_new_tokens``; how many requests
   run at once is the engine's business, as in vLLM;
3. ``max_queued_requests`` requests are already waiting (admitted, no token yet: queued for
   blocks, prefilling or KV in transit) (``Overloaded`` -> ``RESOURCE_EXHAUSTED``): a bounded queue
   instead of unbounded latency.

The default queue bound is sized from the KV budget: ``sum over decode workers of
min(max_num_seqs, num_blocks)``, the number of requests the decode workers could run at once if
each held a single block. A queued request then waits for about one generation of running requests.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

from ...engine.scheduler import max_kv_tokens
from ...limits import InvalidRequest
from ..errors import Draining, Overloaded
from .calls import GenerateCall


@dataclass(frozen=True)
class KVLimits:
    """One decode worker's cache, as its actor reports it at start-up (all decode workers are alike)."""

    num_blocks: int
    block_size: int
    context_limit: int

    def blocks_for(self, num_prompt_tokens: int, max_new_tokens: int) -> int:
        # The most blocks the request can come to hold (the decode worker's scheduler refuses by the same rule).
        return -(-max_kv_tokens(num_prompt_tokens, max_new_tokens, self.context_limit) // self.block_size)


def default_max_queued_requests(num_blocks_per_worker: list[int], max_num_seqs: int) -> int:
    return max(1, sum(min(max_num_seqs, n) for n in num_blocks_per_worker))


class Admission:
    def __init__(self, kv: KVLimits, max_queued_requests: int):
        if max_queued_requests < 1:
            raise ValueError(f"max_queued_requests: must be >= 1, got {max_queued_requests}")
        self.kv = kv
        self.max_queued_requests = max_queued_requests
        self.is_draining = False
        self._waiting: set[str] = set()
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()  # the gRPC and HTTP front ends may admit from different threads

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def in_flight(self) -> list[str]:
        with self._lock:
            return sorted(self._in_flight)

    def admit(self, request_id: str, call: GenerateCall) -> None:
        """Take the request on or raise why not."""
        if self.is_draining:
            raise Draining("the server is shutting down and admits no new requests")
        n, m = len(call.prompt_token_ids), call.params.max_new_tokens
        need = self.kv.blocks_for(n, m)
        if need > self.kv.num_blocks:
            kv = self.kv
            raise InvalidRequest(
                "max_new_tokens",
                f"{n} prompt + {m} new tokens need {need} KV blocks of {kv.block_size} tokens, but a decode worker's cache "
                f"holds only {kv.num_blocks} blocks ({kv.num_blocks * kv.block_size} tokens): the request can never run",
            )
        with self._lock:
            if len(self._waiting) >= self.max_queued_requests:
                raise Overloaded(
                    f"server overloaded: {len(self._waiting)} requests already queued (max_queued_requests {self.max_queued_requests}); retry later"
                )
            self._waiting.add(request_id)
            self._in_flight.add(request_id)

    def started(self, request_id: str) -> None:
        """The request produced its first token: it no longer counts against the queue."""
        with self._lock:
            self._waiting.discard(request_id)

    def done(self, request_id: str) -> None:
        with self._lock:
            self._waiting.discard(request_id)
            self._in_flight.discard(request_id)

    async def drain(self, timeout_s: float) -> list[str]:
        """Admit nothing more; wait up to ``timeout_s`` for the requests in flight. Returns those left."""
        self.is_draining = True
        deadline = time.monotonic() + timeout_s
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.in_flight
