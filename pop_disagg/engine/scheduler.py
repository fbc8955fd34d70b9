"""Continuous-batching scheduler: plain Python over ``Request`` counters, no tensors.

Each call to ``schedule`` returns one step's work: either a prefill batch (requests admitted this
step whose prompt tokens ``1..N-1`` still need encoding) or a decode batch (every running request,
one token each; under POP this includes new requests' boundary tokens). Prefill goes first so new
requests join the decode batch as soon as possible. Blocks for a request's whole budget
(prompt + max_new_tokens) are reserved at admission: nothing is ever preempted, and a decode
worker that admits a request can always finish it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .kv_cache import BlockManager
from .request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    prefill: list[Request]  # requests whose prompt prefix is encoded this step
    decode: list[Request]  # requests that advance by one token this step

    @property
    def is_empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, context_limit: int, prefill_covers_last: bool = False):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.context_limit = context_limit
        # "No boundary handling" ablation: prefill encodes all N tokens instead of N-1.
        self.prefill_covers_last = prefill_covers_last
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.reserved: list[Request] = []  # disaggregated decode: blocks held, K/V in transit

    def budget_tokens(self, req: Request) -> int:
        return min(req.num_prompt_tokens + req.params.max_new_tokens, self.context_limit)

    def prefill_len(self, req: Request) -> int:
        return req.num_prompt_tokens if self.prefill_covers_last else req.num_prompt_tokens - 1

    def _check_fits(self, req: Request) -> None:
        """A request whose budget exceeds the whole cache could never run: refuse it up front."""
        need = self.blocks.blocks_for(self.budget_tokens(req))
        if need > self.blocks.num_blocks:
            raise ValueError(f"request needs {need} KV blocks but the cache has only {self.blocks.num_blocks}; lower max_new_tokens or raise the KV budget")

    def add(self, req: Request) -> None:
        self._check_fits(req)
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        prefill: list[Request] = []
        num_tokens = 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            n = self.prefill_len(req)
            if prefill and num_tokens + n > self.max_num_batched_tokens:
                break
            if not self.blocks.can_allocate(self.budget_tokens(req)):
                break
            self.waiting.popleft()
            req.block_table = self.blocks.allocate(self.budget_tokens(req))
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            if n > 0:
                prefill.append(req)
                num_tokens += n
        if prefill:
            return SchedulerOutput(prefill=prefill, decode=[])
        return SchedulerOutput(prefill=[], decode=list(self.running))

    # ---- disaggregated decode: prompt K/V written by another worker -----------------------------
    def reserve(self, req: Request) -> bool:
        """Hold blocks for ``req``'s whole budget without queueing it; False when the cache is full.

        The request's prompt K/V is then written into ``req.block_table`` from outside (a KV
        transfer), and ``admit`` puts it in the decode batch.
        """
        self._check_fits(req)
        # Reserved requests count against max_num_seqs: each will join the decode batch.
        if len(self.running) + len(self.reserved) >= self.max_num_seqs:
            return False
        if not self.blocks.can_allocate(self.budget_tokens(req)):
            return False
        req.block_table = self.blocks.allocate(self.budget_tokens(req))
        self.reserved.append(req)
        return True

    def admit(self, req: Request) -> None:
        """A reserved request whose prompt prefix is in its blocks joins the running (decode) set."""
        self.reserved.remove(req)
        req.status = RequestStatus.RUNNING
        self.running.append(req)

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
