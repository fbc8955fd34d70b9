"""Continuous-batching scheduler: plain Python over ``Request`` counters, no tensors.

Each call to ``schedule`` returns one step's work: either a prefill batch (requests admitted this
step whose prompt tokens ``1..N-1`` still need encoding) or a decode batch (every running request,
one token each; under POP this includes new requests' boundary tokens). Prefill goes first so new
requests join the decode batch as soon as possible. Blocks for a request's whole budget
(prompt + max_new_tokens) are reserved at admission: nothing is ever preempted, and a decode
worker that admits a request can always finish it.

Chunked prefill (``enable_chunked_prefill``, vLLM's name) makes ``max_num_batched_tokens`` a
budget for every step's tokens, and a step mixed: every running request whose prompt prefix is in
its blocks decodes one token (these go first, so decode never waits behind a long prompt), then
prompt chunks fill what is left of the budget, partially prefilled requests first (oldest first),
then newly admitted ones; each gets ``min(remaining prefix, budget left)`` tokens. Progress is
``num_computed_tokens``. A request whose chunk completes its prefix this step also feeds its
boundary token ``x_N`` in the *same* step, as one more decode row (one more token of budget): the
decode rows attend to the cache after the step's chunk K/V are written, so ``x_N`` sees its whole
prefix, runs through the full model (POP: every layer) and yields the first token one step, i.e.
one pass over the weights, sooner than a separate decode step would. Blocks are still reserved
for the whole budget at admission, so a half-prefilled request can always finish.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv_cache import BlockManager
from .request import Request, RequestStatus


def reserved_tokens(num_prompt_tokens: int, max_new_tokens: int, context_limit: int) -> int:
    """KV slots a request holds from admission: its prompt plus ``max_new_tokens``, capped by the
    context (the server's admission control sizes requests by the same rule)."""
    return min(num_prompt_tokens + max_new_tokens, context_limit)


@dataclass
class SchedulerOutput:
    prefill: list[Request]  # requests whose prompt prefix (chunked: next chunk) is encoded this step
    decode: list[Request]  # requests that advance by one token this step
    # prompt tokens of each ``prefill`` request this step, from its ``num_computed_tokens`` on
    num_prefill_tokens: list[int] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        context_limit: int,
        prefill_covers_last: bool = False,
        enable_chunked_prefill: bool = False,
    ):
        self.blocks = blocks
        self.enable_chunked_prefill = enable_chunked_prefill
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.context_limit = context_limit
        # "No boundary handling" ablation: prefill encodes all N tokens instead of N-1.
        self.prefill_covers_last = prefill_covers_last
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.reserved: list[Request] = []  # disaggregated decode: blocks held, K/V in transit

    def budget_tokens(self, req: Request) -> int:
        return reserved_tokens(req.num_prompt_tokens, req.params.max_new_tokens, self.context_limit)

    def prefill_len(self, req: Request) -> int:
        return req.num_prompt_tokens if self.prefill_covers_last else req.num_prompt_tokens - 1

    def is_prefilled(self, req: Request) -> bool:
        """Its prompt prefix is in its blocks: it decodes (a one-token prompt is from admission)."""
        return req.num_computed_tokens >= self.prefill_len(req)

    def _check_fits(self, req: Request) -> None:
        """A request whose budget exceeds the whole cache could never run: refuse it up front."""
        need = self.blocks.blocks_for(self.budget_tokens(req))
        if need > self.blocks.num_blocks:
            raise ValueError(
                f"request needs {need} KV blocks but the cache has only {self.blocks.num_blocks}; lower max_new_tokens or raise the KV budget"
            )

    def add(self, req: Request) -> None:
        self._check_fits(req)
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self, req: Request) -> None:
        self.waiting.popleft()
        req.block_table = self.blocks.allocate(self.budget_tokens(req))
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def schedule(self) -> SchedulerOutput:
        if self.enable_chunked_prefill:
            return self._schedule_chunked()
        prefill: list[Request] = []
        num_tokens = 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            n = self.prefill_len(req)
            if prefill and num_tokens + n > self.max_num_batched_tokens:
                break
            if not self.blocks.can_allocate(self.budget_tokens(req)):
                break
            self._admit(req)
            if n > 0:
                prefill.append(req)
                num_tokens += n
        if prefill:
            return SchedulerOutput(
                prefill=prefill, decode=[], num_prefill_tokens=[self.prefill_len(r) for r in prefill]
            )
        return SchedulerOutput(prefill=[], decode=list(self.running))

    def _schedule_chunked(self) -> SchedulerOutput:
        decode = [r for r in self.running if self.is_prefilled(r)]
        budget = self.max_num_batched_tokens - len(decode)
        prefill: list[Request] = []
        num_tokens: list[int] = []
        for req in self.running:  # partially prefilled first: they hold blocks already
            if budget <= 0:
                break
            if not self.is_prefilled(req):
                remaining = self.prefill_len(req) - req.num_computed_tokens
                n = min(remaining, budget)
                prefill.append(req)
                num_tokens.append(n)
                budget -= n
                budget -= self._boundary_row(req, n == remaining, budget, decode)
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            req = self.waiting[0]
            if not self.blocks.can_allocate(self.budget_tokens(req)):
                break
            self._admit(req)
            n = min(self.prefill_len(req), budget)
            if n > 0:
                prefill.append(req)
                num_tokens.append(n)
                budget -= n
                budget -= self._boundary_row(req, n == self.prefill_len(req), budget, decode)
            else:  # one-token prompt: its boundary token decodes right away
                decode.append(req)
                budget -= 1
        return SchedulerOutput(prefill=prefill, decode=decode, num_prefill_tokens=num_tokens)

    def _boundary_row(self, req: Request, prefix_done: bool, budget: int, decode: list[Request]) -> int:
        """Add ``req``'s boundary token to this step's decode rows when its chunk ends the prefix
        and a token of budget is left; returns the tokens used (0 or 1). Not in the no-boundary
        ablation: there the last chunk's pruned pass samples the first token itself."""
        if prefix_done and budget >= 1 and not self.prefill_covers_last:
            decode.append(req)
            return 1
        return 0

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
