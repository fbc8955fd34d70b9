"""The router: one asyncio coroutine per request drives the prefill -> decode hand-off.

For a request of ``N`` prompt tokens it picks the serving decode worker and (disaggregated,
``N > 1``) the prefill worker with a live link to it with the least outstanding work it has handed
them (requests for decode, prompt tokens for prefill), opens the decode worker's stream (which
reserves the blocks), submits the prefix ``x_1..x_{N-1}`` to the prefill worker with the transfer
id, and turns the decode events into text: incremental detokenization and stop strings live here,
not on the GPU workers. With several decode workers and the prefix cache on, the decode worker is
the one ``kv_aware_choice`` scores best (its cached prefix of the prompt against its blocks in use).
The reservation says how many prefix tokens the decode worker already holds: the prefill worker
sends only the rest, and nothing at all (no prefill) when the decode worker holds the whole prefix
or prefills a short rest itself (docs/serving.md, "Across the split").

Failures, and how each one ends (every path frees the request's blocks on every worker):

- the client cancels or disconnects: the handler's task is cancelled; both workers get an abort.
- the deadline passes (``GenerateCall.deadline``, from the gRPC deadline): ``DeadlineExceeded``
  and aborts. The workers hold the deadline too and drop the request by themselves, before their
  next step, should an abort be lost.
- the decode worker dies or hangs: its stream raises, or the supervisor declares it lost
  (``slot.down``) within ``worker_timeout_s``: ``WorkerUnavailable``. New requests are refused at
  once while no decode worker is serving (a load balancer sees ``Health`` not serving).
- the prefill worker dies, or the KV transfer fails (broken link, stall, timeout): the decode
  worker ends the attempt with ``Failed(kind="kv_transfer")``, which has freed its blocks. Nothing
  has been generated yet, so the request is re-run from the reservation on another attempt (a new
  worker-side id ``rid#k``, on any prefill worker whose link to a serving decode worker is up,
  waiting up to ``worker_timeout_s`` for one) — always when the prefill worker died, otherwise as
  ``kv_failure_policy`` says (``recompute``, or ``fail``: ``WorkerUnavailable``). Greedy decoding
  gives the same tokens as without the fault.

Two collaborators see every request: ``observer`` (admission control and metrics: ``admit`` before
anything runs, ``tokens``, ``finished``, ``failed``) and ``depth`` (``depth.DepthController``: which
plan of the served family the prefill runs: the request's own ``prune_ratio``, the default plan,
or the SLO controller's choice; chosen once per request and kept across re-runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from ...disagg.decode_worker import Failed, KVReceived
from ...engine.detokenizer import OutputText
from ..errors import DeadlineExceeded, ServingError, WorkerUnavailable
from .calls import Delta, GenerateCall, GenerateResult, Timings
from .depth import DepthController
from .observer import RequestObserver

__all__ = ["Delta", "Router", "RouterStats", "WorkerUnavailable"]

log = logging.getLogger("pop_disagg.serve")

MAX_ATTEMPTS = 4  # tries of one request's prefill + transfer before it fails


@dataclass
class RouterStats:
    """Cumulative counters, read by the server's periodic stats line (as vLLM logs it)."""

    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_finished: int = 0
    num_failed: int = 0
    ttft_s_sum: float = 0.0
    num_kv_retries: int = 0  # prefill + transfer re-runs after a KV failure


class _KVFailed(Exception):
    """One attempt's prefill or transfer failed before any token was generated."""

    def __init__(self, why: str, prefill: int, decode: int, prefill_actor, prefill_died: bool):
        super().__init__(why)
        self.prefill, self.decode, self.prefill_actor, self.prefill_died = prefill, decode, prefill_actor, prefill_died


@dataclass
class _Request:
    """What one request has produced so far (kept across attempts)."""

    rid: str
    call: GenerateCall
    arrival: float
    out: OutputText  # detokenized text, stop strings, what has been streamed
    tokens: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # aligned with tokens when the request asked for them
    finish: str | None = None
    kv_time: float | None = None
    first_time: float | None = None
    last_time: float | None = None
    plan_index: int | None = None  # the family plan its prefill runs (None: no depth controller / nothing to prefill)
    num_cached_tokens: int = 0  # prompt tokens the decode worker's prefix cache held (colocated)
    prompt_logprobs: list | None = None  # a scoring request's prompt scores, from its first tokens

    def remaining_s(self) -> float | None:
        return None if self.call.deadline is None else self.call.deadline - time.time()


@dataclass
class _Attempt:
    """One try at a request's prefill + decode: the workers it holds and what it has started."""

    wid: str  # the request id the workers know this attempt by
    dslot: object  # the decode worker's supervisor slot
    dactor: object  # its actor at the start of the attempt (a replacement is another attempt)
    down: asyncio.Future  # resolves when the supervisor declares that decode worker lost
    pslot: object | None  # the prefill worker's slot; None: colocated, a one-token prompt, or nothing to send
    prefill_died: bool = False
    prefill_task: asyncio.Task | None = None
    num_held_tokens: int = 0  # prefix tokens the decode worker's prefix cache held at its reservation

    @property
    def decode(self) -> int:
        return self.dslot.index

    @property
    def prefill(self) -> int | None:
        return None if self.pslot is None else self.pslot.index


def kv_aware_choice(
    num_request_blocks: int, overlaps: list[int], active: list[int], overlap_weight: float = 1.0
) -> int:
    """The decode worker to send a request to, as Dynamo's KV router scores them: the blocks it
    would still have to prefill (``num_request_blocks`` less the longest cached prefix it holds,
    ``overlaps[i]`` blocks), weighted by ``overlap_weight``, plus the blocks its running requests
    hold (``active[i]``); the lowest cost wins, ties to the first."""
    costs = [overlap_weight * (num_request_blocks - o) + a for o, a in zip(overlaps, active)]
    return costs.index(min(costs))


def _image_args(call: GenerateCall, link: int | None) -> dict:
    """What the decode worker gets of a request's images: colocated, the images (its engine
    encodes them); disaggregated, only the position offset after the prompt (K/V come encoded)
    and the images' spans and digests (the names of its blocks in the prefix cache)."""
    if not call.images:
        return {}
    if link is None:
        return {"images": call.images}
    return {"remote_image_delta": call.mrope_delta, "image_keys": call.image_keys}


def least_loaded_prefill(choices: list, loads: list[int], same_node) -> object:
    """The prefill worker (slot) with the fewest prompt tokens queued; among equally loaded ones
    (an idle server: all zero), one on the decode worker's node, whose K/V then cross no network."""
    return min(choices, key=lambda s: (loads[s.index], not same_node(s.index)))


class Router:
    def __init__(
        self,
        supervisor,
        tokenizer,
        is_disaggregated: bool,
        kv_failure_policy: str = "recompute",
        worker_timeout_s: float = 30.0,
        observer: RequestObserver | None = None,
        depth: DepthController | None = None,
        block_size: int = 16,
        is_prefix_caching: bool = False,
    ):
        self.sup = supervisor
        self.block_size = block_size  # the decode workers' KV block size (the KV-aware choice counts blocks)
        self.is_prefix_caching = is_prefix_caching
        self.observer = observer or RequestObserver()  # admission control and metrics
        self.depth = depth
        self.tokenizer = tokenizer
        self.is_disaggregated = is_disaggregated
        self.kv_failure_policy = kv_failure_policy
        self.worker_timeout_s = worker_timeout_s
        self._prefill_load = [0] * len(supervisor.prefill)  # prompt tokens submitted, not yet sent
        self._decode_load = [0] * len(supervisor.decode)  # requests in flight
        self._active: set[str] = set()
        self.stats = RouterStats()

    @property
    def num_running(self) -> int:
        return len(self._active)

    async def generate(self, call: GenerateCall, on_first_token: Callable[[], None] | None = None) -> GenerateResult:
        """The whole result; ``on_first_token`` is called when the first token (or the end) arrives."""
        text, tokens, logprobs = [], [], []
        async for item in self.stream(call):
            if on_first_token is not None:
                on_first_token()
                on_first_token = None
            text.append(item.text)
            tokens += item.token_ids
            logprobs += item.logprobs or []
        item.text, item.token_ids = "".join(text), tokens
        item.logprobs = logprobs if call.params.logprobs is not None else None
        return item

    async def stream(self, call: GenerateCall) -> AsyncIterator[Delta | GenerateResult]:
        """Yield ``Delta``s, then one ``GenerateResult`` holding the last delta and the totals."""
        rid = call.request_id or f"req-{uuid.uuid4().hex[:12]}"
        if rid in self._active:
            raise ValueError(f"request_id: {rid!r} is already in flight")
        self.observer.admit(rid, call)  # raises to refuse: draining, queue full, never fits
        self._active.add(rid)
        req = _Request(rid, call, time.time(), OutputText.for_params(self.tokenizer, call.params))
        try:
            attempt = 0
            while True:
                try:
                    async with contextlib.aclosing(
                        self._attempt(req, attempt)
                    ) as items:  # closed at once if our consumer leaves
                        async for item in items:
                            yield item
                    return
                except _KVFailed as exc:
                    attempt += 1
                    await self._after_kv_failure(req, exc, attempt)
        except ServingError as exc:
            log.warning("request %s: %s: %s", rid, exc.grpc_code, exc)
            raise
        except asyncio.CancelledError:
            remaining = req.remaining_s()
            log.info(
                "request %s: %s",
                rid,
                "deadline exceeded (the call was ended)"
                if remaining is not None and remaining <= 0
                else "cancelled by the client",
            )
            raise
        finally:
            self._active.discard(rid)
            if req.finish is None:
                self.stats.num_failed += 1
            self.observer.failed(rid, sys.exc_info()[1])  # a no-op once finished() reported the request

    async def _after_kv_failure(self, req: _Request, exc: _KVFailed, attempt: int) -> None:
        """Decide whether a failed prefill/transfer is re-run (returns) or ends the request (raises).

        Probing the pair first both tells a dead prefill worker from a broken link and starts the
        repair (replacement or re-link) that the next attempt waits for."""
        p, d = exc.prefill, exc.decode
        await self.sup.check(p, d)
        slot = self.sup.prefill[p]
        died = exc.prefill_died or slot.actor is not exc.prefill_actor or not slot.is_serving
        if self.kv_failure_policy == "fail" and not died:
            raise WorkerUnavailable(f"{exc} (--kv-failure-policy fail)")
        if attempt >= MAX_ATTEMPTS:
            raise WorkerUnavailable(f"request {req.rid}: prefill/KV transfer failed {attempt} times; last: {exc}")
        self.stats.num_kv_retries += 1
        log.warning("request %s: %s; re-running its prefill (attempt %d)", req.rid, exc, attempt + 1)

    # ---- one attempt ----------------------------------------------------------------------------
    async def _attempt(self, req: _Request, attempt: int) -> AsyncIterator[Delta | GenerateResult]:
        """Pick the workers, open the decode stream, stream its tokens, then the result."""
        import ray

        att = await self._begin(req, attempt)
        try:
            # Stop strings are applied here (``req.out``), not on the workers.
            params = req.call.params.model_copy(update={"stop": ()})
            link = att.prefill if self.is_disaggregated else None
            gen = att.dactor.generate.remote(
                att.wid,
                req.call.prompt_token_ids,
                params,
                link,
                req.call.deadline,
                req.plan_index,
                **_image_args(req.call, link),
            )
            delta = Delta(req.rid, "", [])
            async with contextlib.aclosing(self._events(gen, att.down, req)) as events:
                async for kind, payload in events:
                    if kind == "reserved":  # the decode worker holds the blocks: start the prefill
                        self._start_prefill(req, att, *payload)
                        continue
                    delta = self._delta(req, self._take_events(req, att, payload))
                    if req.finish is not None:
                        break
                    if delta.token_ids or delta.text:
                        yield delta
                else:
                    raise WorkerUnavailable(f"decode worker {att.decode} ended request {req.rid} without finishing it")
            yield await self._result(req, att, delta)
        except ray.exceptions.RayActorError as exc:
            self.sup.report_failure(att.dslot, att.dactor, f"process died ({exc.__class__.__name__})")
            raise WorkerUnavailable(f"decode worker {att.decode} is unavailable: {exc.__class__.__name__}") from exc
        finally:
            self._release(req, att)

    async def _begin(self, req: _Request, attempt: int) -> _Attempt:
        """Choose the decode worker and (disaggregated, a prefix to prefill) the prefill worker and
        its plan; count the work against both."""
        num_prefix = self._prefix_len(req)
        dslot = await self._pick_decode(req)
        pslot = await self._pick_prefill(req, dslot) if self.is_disaggregated and num_prefix > 0 else None
        att = _Attempt(req.rid if attempt == 0 else f"{req.rid}#{attempt}", dslot, dslot.actor, dslot.down, pslot)
        if pslot is not None and self.depth is not None:
            if attempt == 0:  # chosen once, kept across re-runs
                req.plan_index = self.depth.choose(pslot.index, num_prefix, req.call.plan_index)
            self.depth.on_submit(pslot.index, att.wid, num_prefix, req.plan_index)
        self._decode_load[att.decode] += 1
        if pslot is not None:
            self._prefill_load[pslot.index] += num_prefix
        return att

    @staticmethod
    def _prefix_len(req: _Request) -> int:
        """The prompt prefix the prefill worker encodes: ``x_1..x_{N-1}``, or a scoring request's
        context (none in the ``full`` mode: the decode worker runs the whole prompt on the full model)."""
        return req.call.params.num_pruned_prompt_tokens(len(req.call.prompt_token_ids))

    def _start_prefill(self, req: _Request, att: _Attempt, transfer_id: int, num_held_tokens: int) -> None:
        """The decode worker reserved the request, holding ``num_held_tokens`` of its prefix already:
        the prefill worker sends the rest. Transfer id 0: nothing to send (the decode worker had it
        all, or prefills the short rest itself), so the prefill worker is released untouched."""
        att.num_held_tokens = num_held_tokens
        if att.pslot is None:
            return
        prefix = req.call.prompt_token_ids[: self._prefix_len(req)]
        if transfer_id == 0:
            self._prefill_load[att.pslot.index] -= len(prefix)
            if self.depth is not None:
                self.depth.on_done(att.pslot.index, att.wid)
            att.pslot = None
            return
        att.prefill_task = asyncio.create_task(
            self._prefill(
                att,
                att.pslot,
                att.dactor,
                transfer_id,
                prefix,
                req.call.deadline,
                req.plan_index,
                num_held_tokens,
                req.call.images,
                req.call.image_keys,
            )
        )

    def _take_events(self, req: _Request, att: _Attempt, events: list) -> list[int]:
        """Apply one batch of decode-worker events to the request; returns the new token ids.
        A failure event raises: a KV failure before any token as ``_KVFailed`` (re-run), else the
        serving error it maps to."""
        new_ids: list[int] = []
        for ev in events:
            if isinstance(ev, Failed):
                if ev.kind == "kv_transfer" and att.pslot is not None and not req.tokens:
                    raise _KVFailed(ev.message, att.pslot.index, att.decode, att.pslot.actor, att.prefill_died)
                if ev.kind == "deadline":
                    raise DeadlineExceeded(f"request {req.rid}: deadline exceeded")
                raise WorkerUnavailable(ev.message)
            if isinstance(ev, KVReceived):
                req.kv_time = ev.time
                continue
            req.num_cached_tokens = max(req.num_cached_tokens, ev.num_cached_tokens)
            if ev.prompt_logprobs is not None:
                req.prompt_logprobs = ev.prompt_logprobs
            for i, tok in enumerate(ev.token_ids):
                if req.finish is not None:
                    break  # a stop string ended it; the worker may have run ahead
                req.tokens.append(tok)
                new_ids.append(tok)
                if ev.logprobs is not None:
                    req.logprobs.append(ev.logprobs[i])
                if req.out.add(tok):
                    req.finish = "stop"
            if ev.is_finished and req.finish is None:
                req.finish = ev.finish_reason
        if new_ids:
            self._count_tokens(req, new_ids)
        return new_ids

    def _count_tokens(self, req: _Request, new_ids: list[int]) -> None:
        now = time.time()
        if req.first_time is None:  # the prompt has been processed
            req.first_time = now
            self.stats.num_prompt_tokens += len(req.call.prompt_token_ids)
        self.stats.num_generated_tokens += len(new_ids)
        self.observer.tokens(req.rid, len(new_ids))
        req.last_time = now

    @staticmethod
    def _delta(req: _Request, new_ids: list[int]) -> Delta:
        logprobs = req.logprobs[len(req.logprobs) - len(new_ids) :] if req.call.params.logprobs is not None else None
        is_first = len(new_ids) == len(req.tokens)
        prompt = req.prompt_logprobs if is_first else None
        return Delta(req.rid, req.out.take(is_finished=req.finish is not None), new_ids, logprobs, prompt)

    async def _result(self, req: _Request, att: _Attempt, last: Delta) -> GenerateResult:
        """The finished request's totals and timings (waits for the prefill's own report)."""
        first, end = req.first_time or req.arrival, req.last_time or req.arrival
        timings = Timings(ttft_s=first - req.arrival, decode_s=end - first)
        if req.plan_index is not None:
            timings.prune_ratio = self.depth.family.ratios[req.plan_index]
            timings.num_skipped_layers = len(self.depth.family.plans[req.plan_index].skip_layers)
        if att.prefill_task is not None:
            outcome = await asyncio.wait_for(att.prefill_task, timeout=10)
            if outcome is not None:
                req.num_cached_tokens = max(req.num_cached_tokens, outcome.num_cached_tokens)
                timings.queue_s, timings.prefill_s = outcome.queue_s, outcome.prefill_s
                if req.kv_time is not None:
                    timings.transfer_s = max(0.0, req.kv_time - outcome.compute_end)
                if self.depth is not None:
                    self.depth.observe_ttft(timings.ttft_s, outcome.queue_s, outcome.prefill_s)
        self.stats.num_finished += 1
        self.stats.ttft_s_sum += timings.ttft_s
        n = len(req.call.prompt_token_ids)
        result = GenerateResult(
            req.rid,
            last.text,
            last.token_ids,
            req.finish,
            n,
            len(req.tokens),
            timings,
            last.logprobs,
            req.num_cached_tokens,
            req.prompt_logprobs,
        )
        n_sent = self._prefix_len(req) - att.num_held_tokens if att.prefill_task is not None else None
        self.observer.finished(req.rid, result, n_sent)
        return result

    def _release(self, req: _Request, att: _Attempt) -> None:
        """Give back what the attempt counted and, unless the workers finished it, abort it on both."""
        self._decode_load[att.decode] -= 1
        if att.pslot is not None and self.depth is not None:
            self.depth.on_done(
                att.pslot.index, att.wid
            )  # no-op once the prefill reported; frees a task never submitted
        if req.finish is None or req.finish == "stop":
            # Cancelled, failed, or stopped here by a stop string: release both sides.
            self._abort(att.dactor, att.pslot and att.pslot.actor, att.wid)
        if att.prefill_task is not None and not att.prefill_task.done():
            att.prefill_task.cancel()

    async def _pick_decode(self, req: _Request):
        """The serving decode worker with the fewest requests in flight; with several and the prefix
        cache on, the one ``kv_aware_choice`` scores best from their answers to a probe (longest
        cached prefix of this prompt under its plan, blocks in use), ties by requests in flight.
        The probe names the request's own plan or the default one: an adaptive depth choice is
        made after the worker is picked."""
        serving = [s for s in self.sup.decode if s.is_serving]
        if not serving:
            states = ", ".join(f"{s.name} {s.state.value}" for s in self.sup.decode)
            raise WorkerUnavailable(f"no decode worker is serving ({states}); retry shortly")
        serving.sort(key=lambda s: self._decode_load[s.index])
        prompt = req.call.prompt_token_ids
        if len(serving) == 1 or not self.is_prefix_caching or len(prompt) < 2:
            return serving[0]
        probes = await asyncio.gather(
            *(s.actor.probe.remote(prompt, req.call.plan_index, req.call.image_keys) for s in serving),
            return_exceptions=True,
        )
        probes = [(0, 0) if isinstance(p, BaseException) else p for p in probes]  # a lost worker: no overlap
        bs = self.block_size
        pick = kv_aware_choice(-(-len(prompt) // bs), [c // bs for c, _ in probes], [a for _, a in probes])
        return serving[pick]

    async def _pick_prefill(self, req: _Request, dslot):
        """The least-loaded prefill worker whose link to ``dslot`` is up (ties: the same node).
        Waits for one while a prefill worker is being replaced or a link re-created (bounded by the
        deadline), else at most ``worker_timeout_s``."""
        d = dslot.index
        loop = asyncio.get_running_loop()
        start = loop.time()

        def live():
            return [s for s in self.sup.prefill if self.sup.is_link_up(s.index, d)]

        while not (choices := live()):
            if not dslot.is_serving:
                raise WorkerUnavailable(f"decode worker {d} was lost: {dslot.message}")
            remaining = req.remaining_s()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded(f"request {req.rid}: deadline exceeded waiting for a prefill worker")
            waited = loop.time() - start
            if waited >= (self.sup.START_TIMEOUT_S if self.sup.is_recovering(d) else self.worker_timeout_s):
                raise WorkerUnavailable(
                    f"no prefill worker has a live link to decode worker {d} (waited {waited:.0f}s)"
                )
            await self.sup.wait_for(
                lambda: bool(live()) or not dslot.is_serving, min(1.0, remaining if remaining is not None else 1.0)
            )
        return least_loaded_prefill(choices, self._prefill_load, lambda p: self.sup.dep.same_node(p, d))

    async def _events(self, gen, down: asyncio.Future, req: _Request):
        """The decode stream's items, each raced against the worker's loss and the deadline."""
        while True:
            try:
                ref = await self._race(gen.__anext__(), down, req)
            except StopAsyncIteration:
                return
            yield await self._race(ref, down, req)

    @staticmethod
    async def _race(aw, down: asyncio.Future, req: _Request):
        task = asyncio.ensure_future(aw)
        try:
            remaining = req.remaining_s()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded(f"request {req.rid}: deadline exceeded")
            done, _ = await asyncio.wait([task, down], timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            if down.done():
                raise WorkerUnavailable(f"request {req.rid}: its decode worker was lost: {down.result()}")
            raise DeadlineExceeded(f"request {req.rid}: deadline exceeded")
        finally:
            if not task.done():
                task.cancel()

    async def _prefill(
        self,
        att: _Attempt,
        pslot,
        dactor,
        transfer_id: int,
        prefix_ids: list[int],
        deadline: float | None,
        plan_index: int | None = None,
        send_start: int = 0,
        images: tuple = (),
        image_keys=None,
    ):
        import ray

        p, pactor = pslot.index, pslot.actor
        outcome = None
        try:
            # The images go to the prefill worker, whose vision encoder runs them; never to the decode side.
            extra = {"images": images, "image_keys": image_keys} if images else {}
            outcome = await pactor.prefill.remote(
                att.wid, transfer_id, att.decode, prefix_ids, deadline, plan_index, send_start, **extra
            )
        except ray.exceptions.RayActorError as exc:
            att.prefill_died = True
            self.sup.report_failure(pslot, pactor, f"process died ({exc.__class__.__name__})")
            outcome, error, kind = None, f"prefill worker {p} died ({exc.__class__.__name__})", "kv_transfer"
        else:
            error = outcome.error and f"prefill worker {p}: {outcome.error}"
            kind = "deadline" if outcome.error == "deadline exceeded" else "kv_transfer"
        finally:
            self._prefill_load[p] -= len(prefix_ids)
            if self.depth is not None:
                measured = outcome is not None and not outcome.error
                self.depth.on_done(
                    p, att.wid, outcome.prefill_s if measured else None, outcome.num_batch_tokens if measured else 0
                )
        if error:
            dactor.abort.remote(att.wid, error, kind)  # ends the decode stream with the reason
        return outcome

    @staticmethod
    def _abort(dactor, pactor, wid: str) -> None:
        # Fire and forget: both calls are idempotent and a dead actor just drops them.
        dactor.abort.remote(wid)
        if pactor is not None:
            pactor.abort.remote(wid)
