"""Continuous-batching scheduler: plain Python over ``Request`` counters, no tensors; it owns who
holds which KV blocks (on demand, preemption, the prefix cache).

Each call to ``schedule`` returns one step's work: either a prefill batch (requests admitted this
step whose prompt tokens ``1..N-1`` still need encoding) or a decode batch (every running request,
one token each; under POP this includes new requests' boundary tokens). Prefill goes first so new
requests join the decode batch as soon as possible.

Chunked prefill (``enable_chunked_prefill``, vLLM's name) makes ``max_num_batched_tokens`` a
budget for every step's tokens, and a step mixed: every running request whose prompt prefix is in
its blocks decodes one token (these go first, so decode never waits behind a long prompt), then
prompt chunks fill what is left of the budget, partially prefilled requests first (oldest first),
then newly admitted ones; each gets ``min(remaining prefix, budget left)`` tokens. Progress is
``num_computed_tokens``. A request whose chunk completes its prefix this step also feeds its
boundary token ``x_N`` in the *same* step, as one more decode row (one more token of budget): the
decode rows attend to the cache after the step's chunk K/V are written, so ``x_N`` sees its whole
prefix, runs through the full model (POP: every layer) and yields the first token one step, i.e.
one pass over the weights, sooner than a separate decode step would.

KV blocks, as vLLM takes them (docs/serving.md, "KV memory"):

* On demand. Admission takes blocks for what the request computes in that step (its prefix, or
  its first chunk); a running request takes one more block when its next token crosses a block
  boundary. A request that could never fit (``max_kv_tokens`` over the whole cache) is refused
  up front, so the oldest running request can always finish.
* Recompute preemption. When a running request needs a block and none is free, the newest running
  request is preempted: its blocks are released, it goes back to the *front* of the waiting queue
  with its generated tokens kept, and on re-admission its positions are computed again as the
  original run computed them: ``0..prefill_len-1`` by the pruned prefill (the plan), the boundary
  token and the generated tokens ``prefill_len..num_tokens-2`` through every layer (the decode
  steps that first wrote them ran the full model; ``SchedulerOutput.recompute``). Nothing is
  sampled while recomputing; the next token comes from its next decode step, so the stream goes
  on without a repeated token. No request is admitted in a step that preempted.
* Prefix cache (``prefix_key`` given). Every full block a request computes is published under
  ``block_hash(parent, tokens, prefix_key + mode)``, where ``mode`` is how many of the block's
  positions the pruned prefill wrote (the rest were written by the full model). Under the empty
  plan the two are the same computation and the mode is left out. At admission the longest run of
  cached blocks that the request would compute the same way is taken (``num_computed_tokens``
  starts after it), capped so that at least the token the next step needs is computed: the boundary
  token always runs (POP: through every layer), in whole-prompt steps as a decode row beside the
  uncached rest (``ModelRunner.mixed``), so a warm request's first token comes one step earlier.
  A fresh request under POP therefore reuses only blocks another request prefilled with the same plan; a preempted one also its own full-model
  blocks; under the full model a multi-turn follow-up also the earlier turn's generated blocks.
  A prompt with images names its blocks with their digests too (``Request.image_keys``), so only
  the same images behind the same tokens match; a model whose images attend both ways (Gemma-3)
  reuses such a prefix only when it covers every image (``ImageKeys.resumable``).
* Disaggregated decode (``reserve``/``admit``): blocks for the transferred prefix are held while
  its K/V arrive; decoding then grows on demand. Reserved with the key the prefill worker computes
  under (``Request.prefix_key``: its plan and K/V correction), the request first takes the blocks
  cached under that key, only the rest is transferred, and its blocks are published under that key
  once admitted; without a key transferred K/V are never published. A preempted transferred
  request is re-prefilled here, under this engine's plan, and is local from then on. A scoring
  request's transferred prefix is only its context (``SamplingParams.num_pruned_prompt_tokens``):
  the rest of its prompt runs here on the full model before its first decode step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv_cache import BlockManager, PrefixKey, block_hash
from .request import Request, RequestStatus


def max_kv_tokens(num_prompt_tokens: int, max_new_tokens: int, context_limit: int) -> int:
    """The most KV slots a request can come to hold: its prompt plus ``max_new_tokens``, capped by
    the context. Blocks are taken on demand; this only says whether a request could ever fit the
    cache (the server's admission control refuses by the same rule)."""
    return min(num_prompt_tokens + max_new_tokens, context_limit)


@dataclass
class SchedulerOutput:
    prefill: list[Request]  # requests whose prompt prefix (chunked: next chunk) is encoded this step, under the plan
    decode: list[Request]  # requests that advance by one token this step
    # prompt tokens of each ``prefill`` request this step, from its ``num_computed_tokens`` on
    num_prefill_tokens: list[int] = field(default_factory=list)
    # preempted requests re-running positions the full model first computed (boundary token, generated
    # tokens), from their ``num_computed_tokens`` on: every layer, nothing sampled; run after ``prefill``
    # (whole-prompt steps) and before the decode rows (chunked steps, where the two never share a request)
    recompute: list[Request] = field(default_factory=list)
    num_recompute_tokens: list[int] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.prefill and not self.decode and not self.recompute


@dataclass
class SchedulerStats:
    """Cumulative counters (the server exports them as ``pop_disagg:*_total``)."""

    num_preemptions: int = 0
    num_prefix_cache_queries: int = 0  # tokens of admitted requests looked up in the prefix cache
    num_prefix_cache_hits: int = 0  # of those, found cached


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        context_limit: int,
        prefill_covers_last: bool = False,
        enable_chunked_prefill: bool = False,
        prefix_key: bytes | None = None,
        is_prefill_full_model: bool = False,
    ):
        self.blocks = blocks
        self.enable_chunked_prefill = enable_chunked_prefill
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.context_limit = context_limit
        # "No boundary handling" ablation: prefill encodes all N tokens instead of N-1.
        self.prefill_covers_last = prefill_covers_last
        # Prefix cache: None = off; else the plan's key (kv_cache.plan_cache_key). Under the empty
        # plan prefill and decode write the same K/V, so a block's key does not say which wrote it.
        self.prefix_key = None if prefix_key is None else PrefixKey(prefix_key, is_prefill_full_model)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last is preempted first
        self.reserved: list[Request] = []  # disaggregated decode: blocks held, K/V in transit
        self.partial: list[Request] = []  # admitted with a transferred prefix short of their prefix
        self.stats = SchedulerStats()

    # ---- a request's phases, from its counters --------------------------------------------------
    def prefill_len(self, req: Request) -> int:
        """Positions the pruned prefill computes (the rest run the full model; a scoring request
        runs more of its prompt there, ``SamplingParams.num_pruned_prompt_tokens``)."""
        if self.prefill_covers_last:
            return req.num_prompt_tokens
        return req.params.num_pruned_prompt_tokens(req.num_prompt_tokens)

    def prefix_len(self, req: Request) -> int:
        """Positions in its blocks before its next decode step: the prompt prefix, or for a preempted
        request everything but its last generated token (the next decode input)."""
        return max(self.prefill_len(req), req.num_tokens - 1)

    def is_prefilled(self, req: Request) -> bool:
        """Its prefix is in its blocks: it decodes (a one-token prompt is from admission)."""
        return req.num_computed_tokens >= self.prefix_len(req)

    def _next_run(self, req: Request, start: int) -> tuple[int, bool]:
        """From position ``start``: tokens up to the end of the current kind of computation, and
        whether that kind is the pruned prefill (else the full model). A chunk never spans both."""
        p = self.prefill_len(req)
        if start < p:
            return p - start, True
        return self.prefix_len(req) - start, False

    def _samples_from_prefill(self, req: Request) -> bool:
        """The no-boundary ablation's first token comes from the pruned pass (not when recomputing)."""
        return self.prefill_covers_last and req.num_output_tokens == 0

    def _check_fits(self, req: Request) -> None:
        """A request that could outgrow the whole cache could never finish: refuse it up front."""
        need = self.blocks.blocks_for(
            max_kv_tokens(req.num_prompt_tokens, req.params.max_new_tokens, self.context_limit)
        )
        if need > self.blocks.num_blocks:
            raise ValueError(
                f"request needs {need} KV blocks but the cache has only {self.blocks.num_blocks}; lower max_new_tokens or raise the KV budget"
            )

    def add(self, req: Request) -> None:
        self._check_fits(req)
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _has_seat(self) -> bool:
        # Reserved requests count against max_num_seqs: each will join the decode batch.
        return len(self.running) + len(self.reserved) < self.max_num_seqs

    # ---- blocks ---------------------------------------------------------------------------------
    def key_of(self, req: Request) -> PrefixKey:
        """The key ``req``'s blocks are named under: its own (a transferred prefix computed under
        another plan of the family, or with a K/V correction) or this engine's plan."""
        return req.prefix_key or self.prefix_key

    def _block_key(self, req: Request, index: int) -> bytes:
        """The prefix key of block ``index`` of ``req``: the plan and, unless prefill is the full
        model, how many of the block's positions the pruned prefill wrote."""
        bs = self.blocks.block_size
        return self.key_of(req).block(min(max(self.prefill_len(req) - index * bs, 0), bs))

    def _block_hash(self, req: Request, index: int) -> bytes:
        bs = self.blocks.block_size
        hashes = req.block_hashes
        while len(hashes) <= index:
            i = len(hashes)
            parent = hashes[-1] if hashes else b""
            a, b = i * bs, (i + 1) * bs
            digests = req.image_keys.digests_between(a, b) if req.image_keys is not None else b""
            hashes.append(block_hash(parent, req.token_ids_between(a, b), self._block_key(req, i), digests))
        return hashes[index]

    def _cached_prefix(self, req: Request) -> list[int]:
        """The longest run of cached blocks ``req`` can start from. Capped below its prefix length so
        the next step has a token to compute (the boundary token, or the pruned pass's last token
        when that pass samples)."""
        if self.prefix_key is None or req.prompt_logprobs is not None or not req.is_prefix_cacheable:
            return []
        limit = self.prefix_len(req) - (1 if self._samples_from_prefill(req) else 0)
        hits = []
        for index in range(limit // self.blocks.block_size):
            block = self.blocks.cached_block(self._block_hash(req, index))
            if block is None:
                break
            hits.append(block)
        if req.image_keys is not None:
            hits = hits[: req.image_keys.resumable(len(hits) * self.blocks.block_size) // self.blocks.block_size]
        return hits

    def _publish(self, req: Request) -> None:
        """Publish the request's blocks that its computed positions fill."""
        num_full = req.num_computed_tokens // self.blocks.block_size
        for index in range(req.num_published_blocks, num_full):
            self.blocks.cache(req.block_table[index], self._block_hash(req, index))
        req.num_published_blocks = max(req.num_published_blocks, num_full)

    def _try_admit(self, req: Request, hits: list[int], num_tokens: int) -> bool:
        """Admit the head of the waiting queue with cache hits ``hits`` and blocks for its first
        ``num_tokens`` positions, if the free blocks allow (admission never preempts)."""
        num_new = self.blocks.blocks_for(num_tokens) - len(hits)
        if num_new > self.blocks.num_free_blocks - self.blocks.num_evictable_among(hits):
            return False
        self.waiting.popleft()
        self._start_after(req, hits, num_new)
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        return True

    def _start_after(self, req: Request, hits: list[int], num_new: int) -> None:
        """Give ``req`` its cache hits and ``num_new`` fresh blocks; it computes from after the hits."""
        self.blocks.take(hits)
        req.block_table = hits + self.blocks.allocate_blocks(num_new)
        num_cached = len(hits) * self.blocks.block_size
        req.num_computed_tokens = num_cached
        req.num_published_blocks = len(hits)
        if req.num_cached_tokens is None:  # what the client is told: its first admission
            req.num_cached_tokens = num_cached
        if self.prefix_key is not None:
            self.stats.num_prefix_cache_queries += req.num_tokens
            self.stats.num_prefix_cache_hits += num_cached

    def num_cached_prefix_tokens(self, req: Request) -> int:
        """Prompt positions a fresh ``req`` would find cached now (a look, nothing is taken)."""
        return len(self._cached_prefix(req)) * self.blocks.block_size

    def _grow(self, req: Request, num_tokens: int, step: SchedulerOutput | None) -> bool:
        """Blocks for ``req``'s first ``num_tokens`` positions, preempting the newest running requests
        while none are free (with ``step``; without, only free blocks); False when ``req`` itself
        had to go (or, without ``step``, when the blocks are not there)."""
        need = self.blocks.blocks_for(num_tokens) - len(req.block_table)
        while need > self.blocks.num_free_blocks:
            if step is None:
                return False
            victim = self.running[-1]
            self._preempt(victim, step)
            if victim is req:
                return False
        if need > 0:
            req.block_table.extend(self.blocks.allocate_blocks(need))
        return True

    def _preempt(self, req: Request, step: SchedulerOutput) -> None:
        """Release ``req``'s blocks and put it at the front of the waiting queue, to be recomputed.
        Its published blocks stay cached (evictable) and are its own cache hits when it returns."""
        assert req is self.running[-1]  # always the newest (``_grow``'s victim)
        self.running.pop()
        if req in step.decode:  # scheduled earlier in this step (a decode row): take it back
            step.decode.remove(req)
        self.blocks.free(req.block_table)
        req.block_table = []
        req.num_computed_tokens = 0
        req.num_published_blocks = 0
        req.is_kv_local = True  # a transferred prefix is re-prefilled here, under this engine's plan
        if req.prefix_key is not None:
            req.prefix_key, req.block_hashes = None, []
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting.appendleft(req)

    # ---- the step -------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        if self.enable_chunked_prefill:
            return self._schedule_chunked()
        step = SchedulerOutput(prefill=[], decode=[])
        num_tokens = self._schedule_partial(step)
        while self.waiting and self._has_seat():
            req = self.waiting[0]
            hits = self._cached_prefix(req)
            start, end = len(hits) * self.blocks.block_size, self.prefix_len(req)
            if num_tokens and num_tokens + end - start > self.max_num_batched_tokens:
                break
            if not self._try_admit(req, hits, end):
                break
            # The whole prefix in this step: the pruned part, then (a preempted request) the part
            # the full model first computed.
            num_pruned = max(0, self.prefill_len(req) - start)
            num_full = end - start - num_pruned
            if num_pruned:
                step.prefill.append(req)
                step.num_prefill_tokens.append(num_pruned)
            if num_full:
                step.recompute.append(req)
                step.num_recompute_tokens.append(num_full)
            num_tokens += end - start
            # A cached prefix's rest runs as a chunk over its blocks, so its boundary token can ride
            # in the same forward as a decode row (as in a chunked step): a warm request's first
            # token one step earlier. Only from free blocks: admission never preempts.
            if start and num_pruned and not num_full and not self._samples_from_prefill(req):
                if self._grow(req, end + 1, None):
                    step.decode.append(req)
        if num_tokens:
            return step
        # Oldest first; the newest are preempted for them (only ever from the end of ``running``).
        i = 0
        while i < len(self.running):
            req = self.running[i]
            if not self._grow(req, req.num_computed_tokens + 1, step):
                break
            step.decode.append(req)
            i += 1
        return step

    def _schedule_partial(self, step: SchedulerOutput) -> int:
        """Whole-prompt steps: admitted requests whose transferred prefix stops short of their
        prefix (a scoring request's context) run the rest on the full model first; returns the
        tokens scheduled. (Chunked steps give such requests chunks like any partial prefill.)"""
        num_tokens = 0
        for req in self.partial:
            if req.status == RequestStatus.RUNNING and not self.is_prefilled(req):
                n = self.prefix_len(req) - req.num_computed_tokens
                step.recompute.append(req)
                step.num_recompute_tokens.append(n)
                num_tokens += n
        self.partial.clear()
        return num_tokens

    def _schedule_chunked(self) -> SchedulerOutput:
        step = SchedulerOutput(prefill=[], decode=[])
        num_preemptions = self.stats.num_preemptions
        # Preemption only ever removes the end of ``running``, so walking it by index is safe.
        i = 0
        while i < len(self.running):
            req = self.running[i]
            i += 1
            if self.is_prefilled(req):
                if not self._grow(req, req.num_computed_tokens + 1, step):
                    break
                step.decode.append(req)
        budget = self.max_num_batched_tokens - len(step.decode)
        i = 0
        while i < len(self.running) and budget > 0:  # partially prefilled first: they hold blocks already
            req = self.running[i]
            i += 1
            if self.is_prefilled(req):
                continue
            start = req.num_computed_tokens
            remaining, is_pruned = self._next_run(req, start)
            n = min(remaining, budget)
            decoded = len(step.decode)
            if not self._grow(req, start + n, step):
                break
            budget += decoded - len(step.decode)  # decode rows preempted for it give their token back
            budget -= n + self._add_chunk(step, req, start, n, is_pruned, budget - n)
        while self.waiting and self._has_seat() and budget > 0 and self.stats.num_preemptions == num_preemptions:
            req = self.waiting[0]
            hits = self._cached_prefix(req)
            start = len(hits) * self.blocks.block_size
            if start == self.prefix_len(req):  # nothing to compute (a one-token prompt, a cached prefix)
                if not self._try_admit(req, hits, start + 1):
                    break
                step.decode.append(req)
                budget -= 1
                continue
            remaining, is_pruned = self._next_run(req, start)
            n = min(remaining, budget)
            if not self._try_admit(req, hits, start + n):
                break
            budget -= n + self._add_chunk(step, req, start, n, is_pruned, budget - n)
        return step

    def _add_chunk(self, step: SchedulerOutput, req: Request, start: int, n: int, is_pruned: bool, budget: int) -> int:
        """Put ``n`` positions of ``req`` from ``start`` into the step (a prompt chunk or, past the
        pruned part, a full-model recompute). When they complete its prefix and a token of budget
        and a block are left, its next decode row rides in the same step (the boundary token; not
        when the pruned pass itself samples, the no-boundary ablation). Returns the tokens of
        budget the ride used (0 or 1)."""
        if is_pruned:
            step.prefill.append(req)
            step.num_prefill_tokens.append(n)
        else:
            step.recompute.append(req)
            step.num_recompute_tokens.append(n)
        end = start + n
        if end < self.prefix_len(req) or budget < 1 or (is_pruned and self._samples_from_prefill(req)):
            return 0
        if not self._grow(req, end + 1, None):
            return 0
        step.decode.append(req)
        return 1

    def update(self, step: SchedulerOutput) -> None:
        """After the runner advanced the counters: publish the blocks this step filled."""
        if self.prefix_key is None:
            return
        for req in {id(r): r for r in step.prefill + step.recompute + step.decode}.values():
            if req.is_kv_local and req.is_prefix_cacheable and req.status == RequestStatus.RUNNING:
                self._publish(req)

    # ---- disaggregated decode: prompt K/V written by another worker -----------------------------
    def reserve(self, req: Request) -> bool:
        """Hold blocks for ``req``'s prefix without queueing it; False when they are not free.

        The request's prompt K/V is then written into ``req.block_table`` from outside (a KV
        transfer), and ``admit`` puts it in the decode batch, where it takes blocks on demand.
        Preempted requests waiting to be re-prefilled here go first: nothing is reserved meanwhile.

        With ``req.prefix_key`` (how the sending worker computes the prefix) and the prefix cache
        on, the request starts from the longest run of blocks cached under that key:
        ``num_computed_tokens`` says where the transfer starts, and once admitted its blocks are
        published under that key like any computed here. Without a key nothing is looked up and
        the transferred blocks are never published.
        """
        self._check_fits(req)
        if self.waiting or not self._has_seat():
            return False
        hits = self._cached_prefix(req) if req.prefix_key is not None else []
        n = self.blocks.blocks_for(self.prefix_len(req)) - len(hits)
        if n > self.blocks.num_free_blocks - self.blocks.num_evictable_among(hits):
            return False
        if req.prefix_key is not None:
            self._start_after(req, hits, n)
        else:
            req.block_table = self.blocks.allocate_blocks(n)
        req.is_kv_local = False
        self.reserved.append(req)
        return True

    def admit(self, req: Request) -> None:
        """A reserved request whose prompt prefix is in its blocks joins the running (decode) set;
        reserved under a key, its blocks are published from its first step on."""
        self.reserved.remove(req)
        req.is_kv_local = req.prefix_key is not None
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        if not self.enable_chunked_prefill and not self.is_prefilled(req):
            self.partial.append(req)

    def finish(self, req: Request) -> None:
        """Release a request's blocks (finished or aborted) and drop it from the queues."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.reserved:
            self.reserved.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.blocks.free(req.block_table)
        req.block_table = []
        req.status = RequestStatus.FINISHED
