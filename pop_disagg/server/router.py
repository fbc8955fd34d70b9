"""The router: one asyncio coroutine per request drives the prefill -> decode hand-off.

For a request of ``N`` prompt tokens it picks the decode worker and (disaggregated, ``N > 1``) the
prefill worker with the least outstanding work it has handed them (requests for decode, prompt
tokens for prefill), opens the decode worker's stream (which reserves the blocks), submits the
prefix ``x_1..x_{N-1}`` to the prefill worker with the transfer id, and turns the decode events
into text: incremental detokenization and stop strings live here, not on the GPU workers. A
prefill failure aborts the decode side with the reason; a cancelled or disconnected client aborts
both sides, so the blocks return on both workers. The prefill depth (which plan of the served
family the prefill runs) comes from ``depth.DepthController``: the request's own ``prune_ratio``,
the default plan, or the SLO controller's choice.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from ..disagg.decode_worker import Failed, KVReceived, Tokens
from ..engine.detokenizer import IncrementalDetokenizer, find_stop
from .depth import DepthController
from .errors import WorkerUnavailable
from .observer import RequestObserver
from .protocol import GenerateCall, GenerateResult, Timings

__all__ = ["Delta", "Router", "RouterStats", "WorkerUnavailable"]


@dataclass
class Delta:
    """New text and tokens of a streaming request."""

    request_id: str
    text: str
    token_ids: list[int]


@dataclass
class RouterStats:
    """Cumulative counters, read by the server's periodic stats line (as vLLM logs it)."""

    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_finished: int = 0
    num_failed: int = 0
    ttft_s_sum: float = 0.0


class Router:
    def __init__(self, prefill_actors: list, decode_actors: list, tokenizer, is_disaggregated: bool, observer: RequestObserver | None = None,
                 depth: DepthController | None = None):
        self.prefill, self.decode = prefill_actors, decode_actors
        self.depth = depth
        self.tokenizer = tokenizer
        self.is_disaggregated = is_disaggregated
        self._prefill_load = [0] * len(prefill_actors)  # prompt tokens submitted, not yet sent
        self._decode_load = [0] * len(decode_actors)  # requests in flight
        self._active: set[str] = set()
        self.stats = RouterStats()
        self.observer = observer or RequestObserver()  # admission control and metrics

    @property
    def num_running(self) -> int:
        return len(self._active)

    async def generate(self, call: GenerateCall) -> GenerateResult:
        text, tokens = [], []
        async for item in self.stream(call):
            text.append(item.text)
            tokens += item.token_ids
        item.text, item.token_ids = "".join(text), tokens
        return item

    async def stream(self, call: GenerateCall) -> AsyncIterator[Delta | GenerateResult]:
        """Yield ``Delta``s, then one ``GenerateResult`` holding the last delta and the totals."""
        import ray

        rid = call.request_id or f"req-{uuid.uuid4().hex[:12]}"
        if rid in self._active:
            raise ValueError(f"request_id: {rid!r} is already in flight")
        self.observer.admit(rid, call)  # raises to refuse: draining, queue full, never fits
        self._active.add(rid)
        ids, n = call.prompt_token_ids, len(call.prompt_token_ids)
        arrival = time.time()
        d = min(range(len(self.decode)), key=self._decode_load.__getitem__)
        p = min(range(len(self.prefill)), key=self._prefill_load.__getitem__) if self.is_disaggregated and n > 1 else None
        try:
            plan_index = self._choose_plan(p, rid, n, call.prune_ratio)
        except ValueError:
            self._active.discard(rid)
            raise
        self._decode_load[d] += 1
        if p is not None:
            self._prefill_load[p] += n - 1
        worker_params = call.params.model_copy(update={"stop": ()})  # stop strings are checked here
        stops = call.params.stop
        detok = IncrementalDetokenizer(self.tokenizer)
        tokens: list[int] = []
        emitted = 0  # characters of text already yielded
        cut: int | None = None
        finish: str | None = None
        kv_time = first_time = last_time = None
        prefill_task: asyncio.Task | None = None
        try:
            gen = self.decode[d].generate.remote(rid, ids, worker_params, p if self.is_disaggregated else None)
            async for ref in gen:
                kind, payload = await ref
                if kind == "reserved":
                    if p is not None:
                        prefill_task = asyncio.create_task(self._prefill(p, d, rid, payload, ids[:-1], plan_index))
                    continue
                new_ids: list[int] = []
                for ev in payload:
                    if isinstance(ev, Failed):
                        raise WorkerUnavailable(ev.message)
                    if isinstance(ev, KVReceived):
                        kv_time = ev.time
                        continue
                    for tok in ev.token_ids:
                        if finish is not None:
                            break  # a stop string ended it; the worker may have run ahead
                        tokens.append(tok)
                        new_ids.append(tok)
                        new_text = detok.add(tok)
                        if stops and new_text:
                            cut = find_stop(detok.text, stops, len(new_text))
                            if cut is not None:
                                finish = "stop"
                    if ev.is_finished and finish is None:
                        finish = ev.finish_reason
                now = time.time()
                if new_ids:
                    if first_time is None:  # the prompt has been processed
                        first_time = now
                        self.stats.num_prompt_tokens += n
                    self.stats.num_generated_tokens += len(new_ids)
                    self.observer.tokens(rid, len(new_ids))
                    last_time = now
                visible = detok.text if cut is None else detok.text[:cut]
                if finish is None and stops:
                    # Hold back what could still turn out to be the start of a stop string, so the
                    # streamed text never includes what the final text cuts.
                    visible = visible[: max(emitted, len(visible) - max(map(len, stops)) + 1)]
                delta = Delta(rid, visible[emitted:], new_ids)
                emitted = len(visible)
                if finish is not None:
                    break
                if delta.token_ids or delta.text:
                    yield delta
            else:
                raise WorkerUnavailable(f"decode worker {d} ended request {rid} without finishing it")
            timings = Timings(ttft_s=(first_time or arrival) - arrival, decode_s=(last_time or arrival) - (first_time or arrival))
            if plan_index is not None:
                timings.prune_ratio = self.depth.family.ratios[plan_index]
                timings.num_skipped_layers = len(self.depth.family.plans[plan_index].skip_layers)
            if prefill_task is not None:
                outcome = await asyncio.wait_for(prefill_task, timeout=10)
                timings.queue_s, timings.prefill_s = outcome.queue_s, outcome.prefill_s
                if kv_time is not None:
                    timings.transfer_s = max(0.0, kv_time - outcome.compute_end)
                if self.depth is not None:
                    self.depth.observe_ttft(timings.ttft_s, outcome.queue_s, outcome.prefill_s)
            self.stats.num_finished += 1
            self.stats.ttft_s_sum += timings.ttft_s
            result = GenerateResult(rid, delta.text, delta.token_ids, finish, n, len(tokens), timings)
            self.observer.finished(rid, result, is_transferred=prefill_task is not None)
            yield result
        except ray.exceptions.RayActorError as exc:
            raise WorkerUnavailable(f"decode worker {d} is unavailable: {exc.__class__.__name__}") from exc
        finally:
            self._active.discard(rid)
            self._decode_load[d] -= 1
            if p is not None and self.depth is not None:
                self.depth.on_done(p, rid)  # no-op once the prefill reported; frees a task never submitted
            if finish is None:
                self.stats.num_failed += 1
            self.observer.failed(rid, sys.exc_info()[1])  # a no-op once finished() reported the request
            if finish is None or finish == "stop":
                # Cancelled, failed, or stopped here by a stop string: release both sides.
                self._abort(d, p, rid)
            if prefill_task is not None and not prefill_task.done():
                prefill_task.cancel()

    def _choose_plan(self, p: int | None, rid: str, n: int, requested: float | None) -> int | None:
        """Family index of this request's prefill plan (None: no depth controller, or nothing to
        prefill); the chosen work is counted on worker ``p``'s queue from now on."""
        if self.depth is None or n <= 1:
            return None
        index = self.depth.choose(p, n - 1, requested)
        if p is not None:
            self.depth.on_submit(p, rid, n - 1, index)
        return index

    async def _prefill(self, p: int, d: int, rid: str, transfer_id: int, prefix_ids: list[int], plan_index: int | None = None):
        import ray

        ratio = self.depth.family.ratios[plan_index] if plan_index is not None else None
        outcome = None
        try:
            outcome = await self.prefill[p].prefill.remote(rid, transfer_id, d, prefix_ids, ratio)
        except ray.exceptions.RayActorError as exc:
            outcome = None
            error = f"prefill worker {p} is unavailable: {exc.__class__.__name__}"
        else:
            error = outcome.error and f"prefill worker {p}: {outcome.error}"
        finally:
            self._prefill_load[p] -= len(prefix_ids)
            if self.depth is not None:
                measured = outcome is not None and not outcome.error
                self.depth.on_done(p, rid, outcome.prefill_s if measured else None, outcome.num_batch_tokens if measured else 0)
        if error:
            self.decode[d].abort.remote(rid, error)  # ends the decode stream with the reason
        return outcome

    def _abort(self, d: int, p: int | None, rid: str) -> None:
        # Fire and forget: both calls are idempotent and a dead actor just drops them.
        self.decode[d].abort.remote(rid)
        if p is not None:
            self.prefill[p].abort.remote(rid)
