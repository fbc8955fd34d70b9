"""The prefill worker: batches waiting prompt prefixes, runs the (pruned) prefill, ships K/V.

It holds a prefill-only ``CausalLM`` built for its plan (POP: the kept layers plus the skipped
layers' norms and K/V projections, no LM head; ``--prefill full``: every layer, empty plan) and no
KV cache: each layer's K/V leave through the ``PrefillAttention`` sink the moment the layer
finishes, sliced per link and queued on that link's ``KVSender``. The worker never waits for the
sends; a task's ``on_done`` fires when its last layer is on the wire (or the link failed).

Depth per request: a task may name its own plan (one of a nested family, see ``PlanFamily``; the
model is then built for the family's mildest plan and runs any deeper one). A step groups its tasks
by plan and runs one forward pass per plan, mildest first; every pass is a batch of its own on
the links, so the decode side sees nothing new.

Chunked prefill (``enable_chunked_prefill``): a step takes at most ``max_num_batched_tokens``
prompt tokens, so one long prompt no longer holds every short one back for its whole length. A
task gets ``min(remaining, budget left)`` tokens; one that is not done goes to the back of the
queue (round robin: the short prompts queued behind it get their turn in the next step). Its
kept layers' K/V stay in a per-task buffer for its later chunks to attend to
(``ChunkedPrefillAttention``); each chunk's K/V leave at once, naming their start position, and
the decode worker writes them at that offset. ``on_done`` fires when the last chunk is sent.

Prefix reuse (``cache``, ``prefill_cache.py``): a task first takes the blocks its prefix finds
cached there and encodes from after them (their kept layers' K/V seed its attention buffers, as
earlier chunks' do); what it encodes into its full blocks is published after its last chunk. A
task sends from ``send_start`` on (the decode worker holds the positions before): cached positions
from the pool, then the computed ones; a chunk wholly below ``send_start`` sends nothing.

Images (vision-language models): a task may carry its prompt's images as the image processor left
them; the worker's vision encoder runs them in the task's first step (their time is part of that
step's prefill), and the image rows then go through the pass like any prompt row (the plan skips
their layers). Only K/V leave the worker, never pixels or features. With the images' digests
(``PrefillTask.image_keys``) such a prompt's blocks are cached like any other's, under names
that say which images they hold; a task whose cached prefix covers every image skips the vision
encoder (the same images again: a follow-up question on the same picture).

Every task's ``on_done`` fires exactly once, also when it never runs: aborted while waiting, its
deadline passed while waiting (dropped before its batch is taken; a chunked prompt also between
its chunks), or its link was re-created while it waited (``purge_link``). Fault hook for tests:
``pause_until`` holds waiting tasks back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..engine import mm_inputs
from ..engine.kv_cache import PrefixKey
from ..models.attention import ChunkedPrefillAttention
from ..models.decoder import CausalLM
from ..models.multimodal import ImageKeys
from ..pop.plan import PrunePlan
from .kv_transfer import KVSender, SendBatch
from .prefill_cache import CachedPrefix, PrefillCache


@dataclass
class PrefillOutcome:
    """What the router learns about one task. Times are wall clock (``time.time()``)."""

    request_id: str
    error: str | None
    queue_s: float  # submit -> its batch started
    prefill_s: float  # the batch's forward pass, up to the last layer's K/V
    compute_end: float  # the last layer's K/V existed
    sent_time: float  # last layer handed to the transport
    num_batch_tokens: int = 0  # prompt tokens in the forward pass that held it (throughput = this / prefill_s)
    num_cached_tokens: int = 0  # prefix tokens found in this worker's prefix cache (not encoded again)


@dataclass
class PrefillTask:
    request_id: str
    transfer_id: int
    link: int  # decode worker index
    prefix_ids: list[int]  # x_1..x_{N-1}
    on_done: Callable[[PrefillOutcome], None]
    submit_time: float = 0.0
    plan: PrunePlan | None = None  # None: the worker's default plan
    deadline: float | None = None  # wall clock: dropped unstarted once it passes
    send_start: int = 0  # the decode worker holds positions before this (its prefix cache): not sent
    # Chunked prefill progress (worker-owned): tokens already sent, the kept layers' K/V of those
    # tokens, when the first chunk started, prompt tokens of the steps that carried it, done flag.
    num_done: int = 0
    kv_buffer: dict = field(default_factory=dict)
    # Vision-language models: the prompt's images (``ProcessedImage``), then (worker-owned) their
    # encoded rows (``PromptImages``), made in the task's first step; their spans and digests
    # (``ImageKeys``), without which the task bypasses the prefix cache.
    images: list = field(default_factory=list)
    encoded: object | None = None
    image_keys: ImageKeys | None = None
    start_time: float = 0.0
    num_step_tokens: int = 0
    is_reported: bool = False
    # Prefix cache (worker-owned): its blocks there, and the positions found cached (not encoded).
    cached: CachedPrefix | None = None
    num_cache_hits: int = 0


log = logging.getLogger("pop_disagg.prefill")


def _fail(task: PrefillTask, why: str) -> None:
    now = time.time()
    task.on_done(PrefillOutcome(task.request_id, why, now - (task.submit_time or now), 0.0, now, now))


class PrefillWorker:
    def __init__(
        self,
        model: CausalLM,
        plan: PrunePlan,
        senders: dict[int, KVSender],
        max_num_batched_tokens: int = 8192,
        enable_chunked_prefill: bool = False,
        cache: PrefillCache | None = None,
        prefix_key: Callable[[PrunePlan], PrefixKey] | None = None,
    ):
        if not plan.independent_kv or not plan.boundary_handling:
            raise ValueError(
                "disaggregated prefill needs independent_kv and boundary_handling (the decode worker gets every layer's K/V and runs token N)"
            )
        self.model, self.plan, self.senders = model, plan, senders
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        # Prefix cache (prefill_cache.py) and how a plan's K/V are named there; both or neither.
        self.cache, self.prefix_key = (
            (cache, prefix_key) if cache is not None and prefix_key is not None else (None, None)
        )
        self.waiting: deque[PrefillTask] = deque()
        self._cv = threading.Condition()
        self._num_waiting_tokens = 0
        self.pause_until = 0.0  # fault hook: no batch is taken before this wall-clock time
        self.vision = None  # (VisionEncoder, VisionSpec) of a vision-language checkpoint, see load_vision

    def load_vision(self, model_path: str) -> None:
        """The checkpoint's vision encoder: this worker encodes its prompts' images."""
        from transformers import AutoTokenizer

        from ..models.vision import VisionEncoder, VisionSpec

        spec = VisionSpec.from_pretrained(model_path, AutoTokenizer.from_pretrained(model_path))
        self.vision = (VisionEncoder(model_path, self.model.dtype, self.model.device), spec)

    @property
    def num_waiting_tokens(self) -> int:
        return self._num_waiting_tokens

    def submit(self, task: PrefillTask) -> None:
        sender = self.senders.get(task.link)
        if sender is None or sender.broken is not None:
            _fail(
                task,
                f"no link to decode worker {task.link}"
                if sender is None
                else f"link to decode worker {task.link} is broken: {sender.broken}",
            )
            return
        if task.plan is not None and not self.model.can_run(task.plan):
            now = time.time()
            task.on_done(
                PrefillOutcome(
                    task.request_id, f"this prefill worker cannot run {task.plan.describe()}", 0.0, 0.0, now, now
                )
            )
            return
        if not 0 <= task.send_start < len(task.prefix_ids):
            _fail(task, f"send_start {task.send_start}: nothing of a {len(task.prefix_ids)}-token prefix to send")
            return
        task.submit_time = time.time()
        with self._cv:
            self.waiting.append(task)
            self._num_waiting_tokens += len(task.prefix_ids)
            self._cv.notify()

    def abort(self, request_id: str) -> bool:
        """Drop a task that has not started; a running one is sent anyway (the receiver discards it)."""
        return bool(self._drop(lambda t: t.request_id == request_id, "aborted"))

    def purge_link(self, link: int, why: str) -> int:
        """Fail every waiting task for ``link``: its link was re-created, their transfer ids are stale."""
        return self._drop(lambda t: t.link == link, why)

    def _drop(self, match: Callable[[PrefillTask], bool], why: str) -> int:
        with self._cv:
            doomed = [t for t in self.waiting if match(t)]
            for task in doomed:
                self.waiting.remove(task)
                self._num_waiting_tokens -= len(task.prefix_ids) - task.num_done
                task.is_reported = True
                self._release(task, publish=False)
        for task in doomed:
            _fail(task, why)
        return len(doomed)

    def _take_batch(self) -> list[tuple[PrefillTask, int, int]]:
        """(task, first position, prompt tokens) this step; whole prefixes unless chunked prefill is on.
        A task's ``num_done`` advances here, under the lock, so ``abort`` counts what is left."""
        batch, num_tokens = [], 0
        now = time.time()
        budget = self.max_num_batched_tokens
        while self.waiting:
            head = self.waiting[0]
            if (deadline := head.deadline) is not None and deadline <= now:
                # Also between the chunks of a started prompt: the decode worker drops the request
                # at the same deadline, so the rest of its prefill would be sent to be discarded.
                task = self.waiting.popleft()
                self._num_waiting_tokens -= len(task.prefix_ids) - task.num_done
                task.is_reported = True
                task.kv_buffer = {}  # its earlier chunks' kept-layer K/V
                self._release(task, publish=False)
                log.info(
                    "request %s: deadline passed while waiting for prefill%s; dropped",
                    task.request_id,
                    f" ({task.num_done} of {len(task.prefix_ids)} tokens sent)" if task.num_done else "",
                )
                _fail(task, "deadline exceeded")
                continue
            # A prompt with images needs their digests: its placeholder ids do not say which image they hold.
            is_cacheable = head.image_keys is not None or (not head.images and head.encoded is None)
            if self.cache is not None and head.cached is None and is_cacheable:
                self._start_cached(head)
            remaining = len(head.prefix_ids) - head.num_done
            if self.enable_chunked_prefill:
                if num_tokens >= budget or any(
                    t is head for t, _, _ in batch
                ):  # budget spent, or back at a task of this step
                    break
                n = min(remaining, budget - num_tokens)
            else:
                n = remaining
                if batch and num_tokens + n > budget:
                    break
            task = self.waiting.popleft()
            if n < remaining:
                self.waiting.append(task)  # round robin: its next chunk after the tasks queued behind it
            batch.append((task, task.num_done, n))
            task.num_done += n
            num_tokens += n
        self._num_waiting_tokens -= num_tokens
        return batch

    def _start_cached(self, task: PrefillTask) -> None:
        """First look at a task (under the lock): take its cached blocks; it encodes from after them."""
        task.cached = self.cache.start(task.prefix_ids, self.prefix_key(task.plan or self.plan), task.image_keys)
        task.num_cache_hits = task.num_done = task.cached.num_hit_tokens(self.cache.block_size)
        self._num_waiting_tokens -= task.num_cache_hits

    def _release(self, task: PrefillTask, publish: bool) -> None:
        """Drop the task's hold on its cached blocks (under the lock), publishing them after its last chunk."""
        if task.cached is not None and task.cached.block_table:
            self.cache.finish(task.cached, publish)

    def run(self, stop: threading.Event) -> None:
        """The worker loop: wait for prompts, prefill a batch, repeat until ``stop`` is set."""
        while not stop.is_set():
            with self._cv:
                if not self.waiting or time.time() < self.pause_until:
                    self._cv.wait(timeout=0.1)
                batch = self._take_batch() if time.time() >= self.pause_until else []
            if batch:
                self.step(batch)

    def step(self, items: list[tuple[PrefillTask, int, int]]) -> None:
        """One forward pass per plan among the (task, first position, tokens) items (mildest plan first)."""
        by_plan: dict[tuple[int, ...], list[tuple[PrefillTask, int, int]]] = {}
        for item in items:
            by_plan.setdefault((item[0].plan or self.plan).skip_layers, []).append(item)
        for skip in sorted(by_plan, key=len):
            group = by_plan[skip]
            self._run_plan(group, group[0][0].plan or self.plan)

    @torch.inference_mode()
    def _run_plan(self, items: list[tuple[PrefillTask, int, int]], plan: PrunePlan) -> None:
        start = time.time()
        items = sorted(items, key=lambda item: item[0].link)  # each link's tokens form one contiguous slice
        tasks = [t for t, _, _ in items]
        starts = [a for _, a, _ in items]
        ids, pos, cu = [], [], [0]
        for t, a, n in items:
            ids += t.prefix_ids[a : a + n]
            pos += range(a, a + n)
            cu.append(cu[-1] + n)
            t.start_time = t.start_time or start
        for t in tasks:
            t.num_step_tokens += cu[-1]
        is_last = [a + n == len(t.prefix_ids) for t, a, n in items]
        with self._cv:  # each task's blocks in the prefix cache as this step starts
            tables = [list(t.cached.block_table) if t.cached is not None else [] for t in tasks]
        for (t, a, _), table in zip(items, tables):
            if table and a == t.num_cache_hits and a and not t.kv_buffer:
                # Its first chunk after cached blocks: their kept layers' K/V are what it attends to.
                kept = set(range(self.model.arch.num_layers)) - set(plan.skip_layers)
                t.kv_buffer = {layer: self.cache.kv(layer, table, 0, a) for layer in kept}
        # (first position sent, end of the part read from the cache); a task released meanwhile
        # (aborted: the decode worker drops what arrives for it) reads nothing from the cache.
        sends = [
            self._send_range(t, a, n) if table else (max(a, t.send_start), 0) for (t, a, n), table in zip(items, tables)
        ]
        groups: list[tuple[KVSender, SendBatch, list[int]]] = []  # (sender, batch, its items)
        for link in sorted({t.link for t in tasks}):
            mine = [i for i, t in enumerate(tasks) if t.link == link and sends[i][0] < starts[i] + items[i][2]]
            if not mine:
                continue  # these chunks are all below what the decode worker holds: nothing to send
            batch = SendBatch(
                [tasks[i].transfer_id for i in mine],
                [starts[i] + items[i][2] - sends[i][0] for i in mine],
                self._on_sent(tasks, mine, is_last),
                starts=[sends[i][0] for i in mine],
            )
            self.senders[link].begin(batch)
            groups.append((self.senders[link], batch, mine))

        last_layer = self.model.arch.num_layers - 1
        cache = self.cache

        def sink(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            # k, v: (T, Hkv, D) for the whole batch -> each link's tokens go out now.
            if cache is not None:
                for i, table in enumerate(tables):
                    if table:
                        cache.write(layer, table, starts[i], k[cu[i] : cu[i + 1]], v[cu[i] : cu[i + 1]])
            for sender, batch, mine in groups:
                if layer == last_layer:
                    batch.compute_end = time.time()  # all K/V exist; the rest of the pass is unused
                if mine[-1] - mine[0] + 1 == len(mine) and all(sends[i] == (starts[i], 0) for i in mine):
                    # every chunk whole and adjacent: one slice of the batch
                    a, b = cu[mine[0]], cu[mine[-1] + 1]
                    sender.send_layer(batch, layer, k[a:b], v[a:b])
                    continue
                ks, vs = [], []
                for i in mine:
                    first, cached_until = sends[i]
                    if first < cached_until:  # the decode worker lacks cached positions: from the pool
                        ck, cv = cache.kv(layer, tables[i], first, cached_until)
                        ks.append(ck)
                        vs.append(cv)
                    lo = cu[i] + max(first, starts[i]) - starts[i]
                    ks.append(k[lo : cu[i + 1]])
                    vs.append(v[lo : cu[i + 1]])
                one = len(ks) == 1
                sender.send_layer(batch, layer, ks[0] if one else torch.cat(ks), vs[0] if one else torch.cat(vs))

        try:
            images = self._encode(tasks)
        except Exception as exc:  # a bad image must not stop the worker: fail these requests
            for sender, batch, _ in groups:
                sender.abandon(batch, f"vision encoder failed: {exc!r}")
            return
        counts = [n for _, _, n in items]
        if all(a == 0 for a in starts) and all(is_last):  # whole prefixes: no buffers to keep
            is_bidirectional = self.vision is not None and self.vision[1].is_bidirectional
            attn = mm_inputs.prefill_attention(images, counts, cu, sink, is_bidirectional, stream_kv=True)
        else:
            attn = ChunkedPrefillAttention(
                cu, sink=sink, stream_kv=True, buffers=[t.kv_buffer for t in tasks], keep=[not x for x in is_last]
            )
        device = self.model.device
        is_ok = True
        try:
            positions = mm_inputs.step_positions(
                images, starts, counts, torch.tensor(pos, device=device), self.model.arch.mrope_section is not None
            )
            vision = mm_inputs.step_vision(images, starts, counts)
            self.model(torch.tensor(ids, device=device), positions, attn, plan=plan, vision=vision)
        except Exception as exc:  # e.g. out of memory: fail these requests, keep the links in step
            is_ok = False
            for sender, batch, _ in groups:
                sender.abandon(batch, f"prefill failed: {exc!r}")
        with self._cv:
            for t, last in zip(tasks, is_last):
                if last or not is_ok:
                    self._release(t, publish=is_ok)
        for t, last in zip(tasks, is_last):
            if last:
                t.kv_buffer = {}

    def _send_range(self, task: PrefillTask, start: int, n: int) -> tuple[int, int]:
        """What of the chunk ``start..start+n-1`` goes on the wire: (first position sent, end of the
        part read from the cache). The decode worker holds everything before ``send_start``; the
        first chunk after cache hits also carries the hits the decode worker lacks."""
        if task.num_cache_hits and start == task.num_cache_hits and task.send_start < start:
            return task.send_start, start
        return max(start, task.send_start), 0

    def _encode(self, tasks: list[PrefillTask]) -> list:
        """Each task's encoded images (None without), running the vision encoder for those not yet
        done, unless the task's cached prefix covers every image (no row of its passes reads them)."""
        from ..models.vision import cached_prompt_images, prompt_images

        for t in tasks:
            if t.images and t.encoded is None:
                encoder, spec = self.vision
                keys = t.image_keys
                if keys is not None and t.num_cache_hits >= keys.spans[-1][1]:
                    t.encoded = cached_prompt_images(spec, t.prefix_ids, t.images, self.model.arch.hidden_size)
                else:
                    features, deepstack = encoder.encode(t.images)
                    t.encoded = prompt_images(spec, t.prefix_ids, t.images, features, deepstack)
                t.images = []  # the pixels are not needed again
        return [t.encoded for t in tasks]

    def _on_sent(self, tasks: list[PrefillTask], mine: list[int], is_last: list[bool]) -> Callable[[SendBatch], None]:
        def done(batch: SendBatch) -> None:
            compute_end = batch.compute_end or batch.finish_time
            for i in mine:
                t = tasks[i]
                if batch.error is not None and not is_last[i]:
                    # A chunk failed: drop the rest of the task (its transfer cannot complete).
                    with self._cv:
                        if t in self.waiting:
                            self.waiting.remove(t)
                            self._num_waiting_tokens -= len(t.prefix_ids) - t.num_done
                        self._release(t, publish=False)
                elif not is_last[i]:
                    continue  # more chunks follow
                with self._cv:
                    if t.is_reported:
                        continue
                    t.is_reported = True
                t.kv_buffer = {}
                t.on_done(
                    PrefillOutcome(
                        t.request_id,
                        batch.error,
                        t.start_time - t.submit_time,
                        compute_end - t.start_time,
                        compute_end,
                        batch.finish_time,
                        t.num_step_tokens,
                        t.num_cache_hits,
                    )
                )

        return done
