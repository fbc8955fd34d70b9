"""The decode worker: the full model, the paged KV cache and a step loop over ``LLMEngine``.

Disaggregated: ``reserve`` allocates blocks for a request's prefix ``x_1..x_{N-1}`` and hands out
a transfer id (a scoring request's transfer is only its context, the rest of its prompt runs here on
the full model: ``SamplingParams.num_pruned_prompt_tokens``); the link's ``KVReceiver`` writes the arriving prefix K/V straight into those blocks;
when the last layer is in, the request is admitted with ``num_computed_tokens = N-1`` and its first
decode step feeds the boundary token ``x_N``; decoding then takes blocks on demand. Reserved with
the prefill worker's ``PrefixKey``, a request first takes the blocks cached under it
(``Reservation.num_cached_tokens``: the transfer starts there, its first message group names that
start), and its blocks are published under the key once admitted. A request that hits the cache and
whose uncached rest is at most ``max_local_prefill_tokens`` (and whose key is this engine's own) is instead queued
here like a colocated one and prefilled under the same plan: transfer id 0, nothing is sent. When the cache
runs out the engine preempts its newest running request: a transferred one is re-prefilled here
(this worker holds every layer) under this engine's plan, and its stream goes on where it was
(``engine/scheduler.py``). Under POP every step here is a one-token step, so new requests' boundary
tokens and running requests' next tokens share one batch. Colocated (``add_local``): the same
engine also prefills, with no transfer. A one-token prompt is admitted at once (nothing to prefill).

Events go to a per-request ``sink`` callback from the step-loop or receiver thread; the actor
shell turns them into a stream. The engine runs without a tokenizer: the router detokenizes and
applies stop strings, the worker stops on EOS, stop token ids and length.

Every way a request can end frees its blocks here, in whatever phase it is (reserved, receiving,
decoding): finish, ``abort`` (the router's cancel), a failed transfer or broken link (``Failed``
with ``kind="kv_transfer"``: the router may re-run the prefill), and the request's own deadline,
checked before every engine step, so an expired request is gone within one step even when the
router's abort never arrives (``kind="deadline"``). Fault hook for tests: ``step_delay_s`` slows
every step, so a generation outlives a deadline however fast the engine is.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from ..engine.engine import LLMEngine
from ..engine.kv_cache import PrefixKey
from ..engine.sampling import SamplingParams
from ..models.multimodal import ImageKeys
from .kv_transfer import KVReceiver, Transfer, TransferError, TransferState, TransferTable, Transport


@dataclass
class KVReceived:
    """The request's prefix K/V is in its blocks (wall clock); for a one-token prompt, at reserve."""

    time: float


@dataclass
class Tokens:
    token_ids: list[int]
    is_finished: bool
    finish_reason: str | None
    logprobs: list | None = None  # a TokenLogprob per token, when the request asked for logprobs
    prompt_logprobs: list | None = None  # a scoring request's prompt scores, with its first token only
    num_cached_tokens: int = 0  # prompt tokens the engine's prefix cache held (colocated)


@dataclass
class Reservation:
    """What ``reserve`` set up for a request: its transfer id (0: nothing will be sent) and the prompt
    positions already in its blocks (prefix-cache hits), from which the prefill worker sends."""

    transfer_id: int
    num_cached_tokens: int = 0
    is_local: bool = False  # this worker prefills the uncached suffix itself (``max_local_prefill_tokens``)


@dataclass
class Failed:
    message: str
    kind: Literal["worker", "kv_transfer", "deadline"] = "worker"  # kv_transfer: the router may re-prefill


Event = KVReceived | Tokens | Failed
Sink = Callable[[Event], None]

log = logging.getLogger("pop_disagg.decode")


class DecodeWorker:
    def __init__(self, engine: LLMEngine, transfer_timeout_s: float = 30.0, max_local_prefill_tokens: int = 0):
        self.engine = engine
        self.transfer_timeout_s = transfer_timeout_s
        # A reserved request whose uncached prefix is at most this long is prefilled here, no transfer.
        self.max_local_prefill_tokens = max_local_prefill_tokens
        self.num_transferred_tokens = 0  # prefix tokens whose K/V arrived over a link
        self.num_local_prefill_tokens = 0  # uncached prefix tokens of reserved requests prefilled here
        self.table = TransferTable()
        self.receivers: dict[int, KVReceiver] = {}
        self._sinks: dict[str, Sink] = {}
        self._transfer_of: dict[str, int] = {}
        self._deadlines: dict[str, float] = {}  # request id -> wall clock after which it is dropped
        self._lock = threading.Lock()  # engine state, the transfer table, the sinks
        self._work = threading.Event()  # set when there may be something to step
        self.step_delay_s = 0.0  # fault hook: pause after every step that ran (outside the lock)

    # ---- links ---------------------------------------------------------------------------------
    def attach_link(self, link: int, transport: Transport) -> None:
        """Attach (or re-create) the link from prefill worker ``link``. Re-creating retires the old
        receiver and fails whatever was reserved on the old link (it will never arrive on the new one)."""
        arch = self.engine.arch
        old = self.receivers.get(link)
        if old is not None:
            old.retire()
            self.fail_link(link, "the link was re-created", [])
        self.receivers[link] = KVReceiver(
            transport,
            link,
            self,
            arch.num_layers,
            (arch.num_kv_heads, arch.head_dim),
            self.engine.kv_cache.k.dtype,
            self.transfer_timeout_s,
        )

    def is_link_broken(self, link: int) -> bool:
        r = self.receivers.get(link)
        return r is None or r.broken is not None

    @property
    def broken_links(self) -> dict[int, str]:
        """Link -> why it broke, for every broken link."""
        return {link: r.broken for link, r in self.receivers.items() if r.broken is not None}

    # ---- requests ------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.engine.blocks.num_free_blocks

    @property
    def counters(self) -> dict[str, int]:
        """The engine's cumulative KV counters (the server turns them into ``pop_disagg:*_total``)."""
        st = self.engine.stats
        return {
            "num_preemptions": st.num_preemptions,
            "prefix_cache_queries": st.num_prefix_cache_queries,
            "prefix_cache_hits": st.num_prefix_cache_hits,
            "kv_transfer_tokens": self.num_transferred_tokens,
            "local_prefill_tokens": self.num_local_prefill_tokens,
        }

    @property
    def num_active(self) -> int:
        return len(self._sinks)

    @property
    def num_receiving(self) -> int:
        """Transfers whose K/V are arriving now (state SENDING)."""
        return sum(t.state == TransferState.SENDING for t in list(self.table.transfers.values()))

    def reserve(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        link: int,
        sink: Sink,
        deadline: float | None = None,
        prefix_key: PrefixKey | None = None,
        remote_image_delta: int | None = None,
        image_keys: ImageKeys | None = None,
    ) -> Reservation | None:
        """Hold blocks for the request; None when the cache is full.

        ``prefix_key``: how the prefill worker computes the prefix (its plan and K/V correction).
        Given, the blocks cached under it are the request's first blocks and the transfer covers
        only the rest (``Reservation.num_cached_tokens`` on); when there was a hit, the rest is at
        most ``max_local_prefill_tokens`` and the key is this engine's own, the request is queued here
        like a colocated one and prefilled under the same plan, with no transfer. A one-token
        prompt, or a prefix cached whole, needs no transfer: it is admitted at once (id 0).
        ``deadline`` (wall clock): the worker drops the request by itself once it passes.
        ``remote_image_delta``/``image_keys``: the prompt has images (encoded on the prefill
        worker): their position offset, and their spans and digests, which name its blocks.
        """
        n = params.num_pruned_prompt_tokens(len(prompt_token_ids))  # the prefix the link brings
        if n > 0 and self.is_link_broken(link):
            raise RuntimeError(
                f"link from prefill worker {link} is broken: {self.receivers[link].broken if link in self.receivers else 'not attached'}"
            )
        with self._lock:
            # Never local: a scoring request (it computes every position, the prefix cache does not
            # serve it) or one with images (encoded on the prefill worker).
            if (
                prefix_key is not None
                and n > 0
                and prefix_key == self.engine.prefix_key
                and params.prompt_logprobs is None
                and remote_image_delta is None
            ):
                num_cached = self.engine.num_cached_prefix_tokens(prompt_token_ids)
                if num_cached and n - num_cached <= self.max_local_prefill_tokens:
                    self.engine.add_request(prompt_token_ids, params, request_id)
                    self._track(request_id, sink, deadline)
                    self.num_local_prefill_tokens += n - num_cached
                    self._work.set()
                    return Reservation(0, num_cached, is_local=True)
            req = self.engine.reserve_request(
                prompt_token_ids, params, request_id, prefix_key, remote_image_delta, image_keys
            )
            if req is None:
                return None
            self._track(request_id, sink, deadline)
            num_cached = req.num_computed_tokens
            if num_cached == n:
                self.engine.admit_prefilled(request_id, n)
                tid = 0
            else:
                tid = self.table.new_id()
                slots = torch.tensor(
                    self.engine.blocks.slots(req.block_table, 0, n),
                    dtype=torch.long,
                    device=self.engine.kv_cache.k.device,
                )
                self.table.transfers[tid] = Transfer(tid, request_id, n, slots, link, num_received=num_cached)
                self._transfer_of[request_id] = tid
        if tid == 0:
            sink(KVReceived(time.time()))
            self._work.set()
        return Reservation(tid, num_cached)

    def _track(self, request_id: str, sink: Sink, deadline: float | None) -> None:
        self._sinks[request_id] = sink
        if deadline is not None:
            self._deadlines[request_id] = deadline

    def num_cached_prefix_tokens(
        self, prompt_token_ids: list[int], prefix_key: PrefixKey | None, image_keys: ImageKeys | None = None
    ) -> int:
        """Prompt tokens the prefix cache holds for this prompt (and its images) under ``prefix_key``
        (the router's probe)."""
        if prefix_key is None:
            return 0
        with self._lock:
            return self.engine.num_cached_prefix_tokens(prompt_token_ids, prefix_key, image_keys)

    @property
    def num_active_blocks(self) -> int:
        """Blocks held by requests (neither free nor evictable)."""
        blocks = self.engine.blocks
        return blocks.num_blocks - blocks.num_free_blocks

    def add_local(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        sink: Sink,
        deadline: float | None = None,
        images: tuple = (),
    ) -> None:
        """Colocated topology: this engine prefills the request itself (and encodes its images)."""
        with self._lock:
            self.engine.add_request(prompt_token_ids, params, request_id, images=list(images) or None)
            self._track(request_id, sink, deadline)
        self._work.set()

    def abort(self, request_id: str, error: str | None = None, kind: str = "worker") -> bool:
        """Free the request's blocks whatever its phase; a transfer in flight is discarded on arrival.

        The request's stream ends with ``Failed(error, kind)`` when an error is given, else finish "abort".
        """
        with self._lock:
            sink = self._sinks.pop(request_id, None)
            self._deadlines.pop(request_id, None)
            tid = self._transfer_of.pop(request_id, None)
            if tid is not None:
                t = self.table.transfers.pop(tid)
                t.state, t.error = TransferState.FAILED, error or "aborted"
            found = self.engine.abort(request_id)
        if found and error:
            log.warning("request %s: ended (%s): %s", request_id, kind, error)
        if sink is not None:
            sink(Failed(error, kind) if error else Tokens([], True, "abort"))
        return found

    def expire(self, now: float | None = None) -> list[str]:
        """Abort every request whose deadline has passed; returns their ids."""
        now = time.time() if now is None else now
        with self._lock:
            expired = [rid for rid, deadline in self._deadlines.items() if deadline <= now]
        for rid in expired:
            self.abort(rid, "deadline exceeded", "deadline")
        return expired

    # ---- ReceiverHost (called from receiver threads) --------------------------------------------
    def begin_transfer(self, transfer_id: int, num_tokens: int, start: int = 0) -> Transfer | None:
        """A message group with ``num_tokens`` prefix tokens from ``start`` on begins (the whole
        prefix, or one chunk of a chunked prefill: chunks come in order)."""
        with self._lock:
            t = self.table.transfers.get(transfer_id)
            if t is None or t.state not in (TransferState.RESERVED, TransferState.SENDING):
                return None  # cancelled: the data is read off the link and dropped
            if start != t.num_received or start + num_tokens > t.num_tokens:
                raise TransferError(
                    f"link {t.link} out of step: transfer {transfer_id} has tokens {start}..{start + num_tokens} on the wire, "
                    f"{t.num_received} of {t.num_tokens} received"
                )
            t.state, t.chunk_start, t.chunk_tokens = TransferState.SENDING, start, num_tokens
            return t

    def write_layer(self, t: Transfer, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        with self._lock:  # an abort may have freed (and re-issued) the blocks since the last layer
            if t.state == TransferState.SENDING:
                self.engine.kv_cache.write(layer, t.chunk_slots, k, v)

    def finish_transfer(self, t: Transfer) -> None:
        with self._lock:
            if t.state != TransferState.SENDING:
                return  # cancelled while in flight
            t.num_received = t.chunk_start + t.chunk_tokens
            self.num_transferred_tokens += t.chunk_tokens
            if t.num_received < t.num_tokens:
                return  # more chunks of this prefix follow
            t.state, t.received_time = TransferState.RECEIVED, time.time()
            self.table.transfers.pop(t.transfer_id, None)
            self._transfer_of.pop(t.request_id, None)
            self.engine.admit_prefilled(t.request_id, t.num_tokens)
            sink = self._sinks.get(t.request_id)
        if sink is not None:
            sink(KVReceived(t.received_time))
        self._work.set()

    def fail_link(self, link: int, why: str, transfers: list[Transfer]) -> None:
        """The link broke: fail what was in flight on it and everything still reserved for it."""
        with self._lock:
            doomed = {t.request_id for t in transfers} | {
                t.request_id for t in self.table.transfers.values() if t.link == link
            }
        for request_id in doomed:
            self.abort(request_id, f"KV transfer from prefill worker {link} failed: {why}", "kv_transfer")

    # ---- the loop ------------------------------------------------------------------------------
    def step(self) -> bool:
        """One engine step; returns False when there was nothing to run."""
        with self._lock:
            if not self.engine.has_unfinished():
                return False
            outputs = self.engine.step()
            events = []
            for out in outputs:
                sink = self._sinks.get(out.request_id)
                if out.finished:
                    self._sinks.pop(out.request_id, None)
                    self._deadlines.pop(out.request_id, None)
                if sink is not None:
                    tokens = Tokens(
                        out.new_token_ids, out.finished, out.finish_reason, out.new_logprobs, out.prompt_logprobs
                    )
                    tokens.num_cached_tokens = out.num_cached_tokens
                    events.append((sink, tokens))
            # A preempted transferred request is re-prefilled here, but not one with images: they
            # never come to this worker (only K/V do).
            stranded = [
                r.request_id
                for r in self.engine.scheduler.waiting
                if r.images is not None and r.images.is_remote and r.num_computed_tokens == 0
            ]
        for sink, event in events:
            sink(event)
        for request_id in stranded:
            self.abort(
                request_id, "preempted under KV pressure; its images were encoded on the prefill worker", "worker"
            )
        return True

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._work.clear()
            if self._deadlines:
                self.expire()
            if not self.step():
                self._work.wait(timeout=0.1)
            elif self.step_delay_s:
                time.sleep(self.step_delay_s)
