"""Model runner: turns scheduled requests into tensors, runs the model, samples.

Owns the model, the KV cache tensors and the prune plan. The kinds of step:

* ``prefill(reqs)``: the pruned pass over each prompt's first ``N-1`` tokens (all ``N`` without
  boundary handling, then it also samples the first token). K/V go straight into the requests'
  blocks through the prefill sink.
* ``decode(reqs)``: one token per request through the full model over the paged cache; its
  tensors (ids, positions, block tables -> slot table, slot mapping, masks) are built once per
  step for all layers, and the forward is eager or, per batch bucket, a CUDA graph / compiled
  function (``compiled_decode.py``).
* ``mixed(decode_reqs, chunk_reqs, num_tokens)``: one chunked-prefill step (``enable_chunked_prefill``),
  a single forward over the decode rows (one token each, full model) followed by the next prompt
  chunk of each chunk request (positions ``num_computed_tokens..+n``, attending to the request's
  earlier chunks in its blocks, the plan's layers skipped: POP per chunk); a request whose chunk
  ends its prefix is also a decode row, its boundary token ``x_N``. A step without chunks is a
  plain ``decode``, compiled path included.
* ``recompute(reqs, num_tokens)``: a preempted request's positions that the full model first
  computed (its boundary token, its generated tokens), re-run through every layer as several new
  tokens over the paged cache, like the decode steps that wrote them; nothing is sampled. A
  scoring request's full-model prompt positions run here too, and get their logprobs
  (``prompt_logprobs.py``).

A request whose prefix starts in cached blocks (prefix cache) is prefilled as a chunk: its new
positions attend to the cached ones in its blocks, the plan's layers skipped as in ``prefill``.

A request with images (``request.images``) runs the same steps: its image rows take the vision
features and its positions are multimodal (``mm_inputs.py``); image rows are prompt rows like any
other, so the plan skips their layers too.
"""

from __future__ import annotations

import weakref

import torch
from torch.nn.utils.rnn import pad_sequence

from ..models.attention import ExtendAttention, MixedAttention, PagedAttention
from ..models.decoder import CausalLM
from ..pop.plan import PrunePlan
from . import mm_inputs, prompt_logprobs
from .compiled_decode import BucketedDecode
from .kv_cache import BlockManager, KVCache
from .request import Request
from .sampling import sample_requests

# Prompt tokens per prefill forward on a CPU. SmolLM2-135M, 8 prompts of 512 tokens, one thread
# (Zen 5): 7.56 s as one 4096-row forward (its GEMMs ran at 144-190 GFLOP/s against ~200 at 512
# rows, and its element-wise work ~30% slower per token), 6.51 s in forwards of 512 tokens, 6.16 s
# of 1024, 6.52 s of 2048.
PREFILL_GROUP_TOKENS = 1024


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        kv_cache: KVCache,
        blocks: BlockManager,
        plan: PrunePlan,
        decode_mode: str | None = None,
        max_num_seqs: int = 64,
        is_chunked: bool = False,
        eos_token_ids: tuple[int, ...] = (),
    ):
        # decode_mode: None = eager; "cuda_graph" / "compile" / "padded": see compiled_decode.py.
        # is_chunked: the scheduler mixes decode rows and prompt chunks in a step (chunked prefill).
        self.is_chunked = is_chunked
        # Tokens per prefill forward on a CPU (``prefill``); a GPU takes the whole batch at once.
        self.prefill_group_tokens = PREFILL_GROUP_TOKENS if model.device.type == "cpu" else 1 << 62
        self.eos_token_ids = eos_token_ids  # masked by the sampler while a request is below its min_tokens
        self.bucketed = BucketedDecode(model, kv_cache, max_num_seqs, decode_mode) if decode_mode else None
        self.model = model
        self.kv_cache = kv_cache
        self.blocks = blocks
        self.plan = plan
        self.device = model.device
        self.is_mrope = model.arch.mrope_section is not None
        self.is_bidirectional_image = model.arch.vision_family == "gemma3"
        self._table_cache: weakref.WeakKeyDictionary[Request, tuple[list[int], int, torch.Tensor]] = (
            weakref.WeakKeyDictionary()
        )

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def run(self, batch) -> tuple[list[Request], list[int]]:
        """One scheduled step (``SchedulerOutput``); returns the requests that got a token and those
        tokens. With chunked prefill the decode rows and prompt chunks share one forward, after any
        recompute (a request whose recompute ends its prefix may be a decode row of the step);
        otherwise a step is a prefill batch (pruned prefixes, then recomputes; no tokens unless the
        plan samples from the pruned pass) or a decode batch."""
        if self.is_chunked:
            self.recompute(batch.recompute, batch.num_recompute_tokens)
            return self.mixed(batch.decode, batch.prefill, batch.num_prefill_tokens)
        if batch.prefill or batch.recompute:
            reqs, tokens = self._prefill_step(batch.prefill, batch.num_prefill_tokens, batch.decode)
            self.recompute(batch.recompute, batch.num_recompute_tokens)
            return reqs, tokens
        return batch.decode, self.decode(batch.decode)

    def _prefill_step(
        self, reqs: list[Request], num_tokens: list[int], boundary: list[Request] = ()
    ) -> tuple[list[Request], list[int]]:
        """Whole prefixes: fresh ones in one pruned prefill, those starting after cached blocks as
        chunks over their blocks, with the boundary token of each of those in ``boundary`` as a
        decode row of the same forward (it gets its first token). Otherwise a token only for a
        request whose pruned pass samples (the no-boundary ablation; a preempted request already
        has its first token)."""
        fresh = [(r, n) for r, n in zip(reqs, num_tokens) if r.num_computed_tokens == 0]
        cached = [(r, n) for r, n in zip(reqs, num_tokens) if r.num_computed_tokens > 0]
        out_reqs, out_tokens = [], []
        if fresh:
            is_new = [not r.output_token_ids for r, _ in fresh]
            sampled = self.prefill([r for r, _ in fresh], [n for _, n in fresh])
            if sampled is not None:
                out_reqs += [r for (r, _), new in zip(fresh, is_new) if new]
                out_tokens += [t for t, new in zip(sampled, is_new) if new]
        if cached:
            r, t = self.mixed(list(boundary), [r for r, _ in cached], [n for _, n in cached])
            out_reqs += r
            out_tokens += t
        return out_reqs, out_tokens

    def prefill(self, reqs: list[Request], num_tokens: list[int]) -> list[int] | None:
        """Encode ``num_tokens[i]`` prompt tokens of each request; returns sampled tokens only
        when the plan disables boundary handling (the pruned pass then predicts token N+1).

        Consecutive requests run as one forward up to ``prefill_group_tokens`` tokens (a longer
        prompt alone): the sequences are independent, and on a CPU a forward over fewer rows keeps
        its activations in cache (SmolLM2, 8 x 512 tokens, one thread: see ``PREFILL_GROUP_TOKENS``).
        """
        groups, start, total = [], 0, 0
        for i, n in enumerate(num_tokens):
            if i > start and total + n > self.prefill_group_tokens:
                groups.append((start, i))
                start, total = i, 0
            total += n
        groups.append((start, len(reqs)))
        sampled = [self._prefill_group(reqs[a:b], num_tokens[a:b]) for a, b in groups]
        return None if sampled[0] is None else [t for group in sampled for t in group]

    @torch.inference_mode()
    def _prefill_group(self, reqs: list[Request], num_tokens: list[int]) -> list[int] | None:
        ids, pos, slots, cu = [], [], [], [0]
        for req, n in zip(reqs, num_tokens):
            ids += req.prompt_token_ids[:n]
            pos += range(n)
            slots += self.blocks.slots(req.block_table, 0, n)
            cu.append(cu[-1] + n)
        slot_mapping = self._tensor(slots)
        sink = lambda layer, k, v: self.kv_cache.write(layer, slot_mapping, k, v)  # noqa: E731
        starts = [0] * len(reqs)
        images = [r.images for r in reqs]
        attn = mm_inputs.prefill_attention(images, num_tokens, cu, sink, self.is_bidirectional_image)
        positions = mm_inputs.step_positions(images, starts, num_tokens, self._tensor(pos), self.is_mrope)
        vision = mm_inputs.step_vision(images, starts, num_tokens)
        hidden = self.model(self._tensor(ids), positions, attn, plan=self.plan, vision=vision)
        for req, n in zip(reqs, num_tokens):
            req.num_computed_tokens = n
        if self.plan.boundary_handling:
            return None
        last = hidden[[c - 1 for c in cu[1:]]]
        return sample_requests(self.model.compute_logits(last), reqs, self.eos_token_ids)

    def _block_tables(self, reqs: list[Request], max_blocks: int, ends: list[int]) -> torch.Tensor:
        """(B, max_blocks) block ids, padded with block 0 (positions past a context are masked).

        ``ends[i]``: positions request ``i`` has after this step, which its blocks must hold (the
        scheduler grows them; a position past them would land in block 0's slots). A request's
        table only changes when it takes a block (every ``block_size`` tokens) or is preempted (a new
        list), so its device tensor is kept and rebuilt only then; a step only pads and stacks.
        """
        bs = self.blocks.block_size
        rows = []
        for r, end in zip(reqs, ends):
            table = r.block_table
            if len(table) * bs < end:
                raise RuntimeError(f"request {r.request_id}: no KV block for position {end - 1} (schedule first)")
            cached = self._table_cache.get(r)
            if cached is None or cached[0] is not table or cached[1] != len(table):
                cached = self._table_cache[r] = (table, len(table), self._tensor(table))
            rows.append(cached[2][:max_blocks])
        return pad_sequence(rows, batch_first=True)  # (B, max_blocks)

    def decode_inputs(self, reqs: list[Request]) -> tuple[torch.Tensor, torch.Tensor, PagedAttention]:
        """One decode step's tensors, built once per step for every layer: (ids, positions, attention)."""
        ids = self._tensor([r.next_input_token for r in reqs])  # (B,)
        pos = self._tensor([r.num_computed_tokens for r in reqs])  # (B,) position of the new token
        bs = self.blocks.block_size
        max_ctx = max(r.num_computed_tokens for r in reqs) + 1
        max_blocks = -(-max_ctx // bs)
        table = self._block_tables(reqs, max_blocks, [r.num_computed_tokens + 1 for r in reqs])
        offs = torch.arange(max_ctx, device=self.device)
        slot_table = table[:, offs // bs] * bs + offs % bs  # (B, S)
        slot_mapping = slot_table.gather(1, pos[:, None])[:, 0]  # (B,) where the new K/V go
        masked_prefix, masked_layers = None, frozenset()
        if not self.plan.independent_kv and self.plan.skip_layers:
            # Ablation: skipped layers wrote no K/V for the pruned prompt positions.
            masked_layers = frozenset(self.plan.skip_layers)
            n_pruned = [r.num_prompt_tokens - (1 if self.plan.boundary_handling else 0) for r in reqs]
            masked_prefix = self._tensor(n_pruned)
        dense = all(r.num_computed_tokens + 1 == max_ctx for r in reqs)  # e.g. batch 1: no padding to mask
        attn = PagedAttention(
            self.kv_cache.k, self.kv_cache.v, slot_mapping, slot_table, pos + 1, masked_prefix, masked_layers, dense
        )
        return ids, mm_inputs.decode_positions([r.images for r in reqs], pos), attn

    @torch.inference_mode()
    def decode_logits(self, reqs: list[Request]) -> torch.Tensor:
        ids, pos, attn = self.decode_inputs(reqs)
        if (
            self.bucketed is not None
            and attn.masked_prefix is None
            and not mm_inputs.has_images([r.images for r in reqs])
            and self.bucketed.handles(len(reqs))
        ):  # the K/V ablation and requests with images stay eager
            logits = self.bucketed(ids, pos, attn.slot_mapping, attn.slot_table)
        else:
            logits = self.model.compute_logits(self.model(ids, pos, attn))
        for r in reqs:
            r.num_computed_tokens += 1
        return logits

    def decode(self, reqs: list[Request]) -> list[int]:
        logits = self.decode_logits(reqs)
        return sample_requests(logits, reqs, self.eos_token_ids)

    def _slot_table(self, reqs: list[Request], context_lens: list[int]) -> torch.Tensor:
        """(B, S) flat slot of every position ``< S = max(context_lens)`` of each request (padded rows are masked)."""
        bs = self.blocks.block_size
        context = max(context_lens)
        table = self._block_tables(reqs, -(-context // bs), context_lens)
        offs = torch.arange(context, device=self.device)
        return table[:, offs // bs] * bs + offs % bs  # (B, S)

    def chunk_inputs(
        self, reqs: list[Request], num_tokens: list[int], is_full_model: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, ExtendAttention]:
        """The next ``num_tokens[i]`` tokens of each request, after its computed ones (prompt chunks;
        with ``is_full_model``, a recompute's full-model positions, which in the "without
        independent K/V" ablation mask the skipped layers' prompt prefix as decode steps do)."""
        ids, pos, seq, cu = [], [], [], [0]
        for i, (req, n) in enumerate(zip(reqs, num_tokens)):
            start = req.num_computed_tokens
            ids += req.token_ids_between(start, start + n)
            pos += range(start, start + n)
            seq += [i] * n
            cu.append(cu[-1] + n)
        context_lens = [r.num_computed_tokens + n for r, n in zip(reqs, num_tokens)]
        slot_table = self._slot_table(reqs, context_lens)  # (B, S)
        pos_t = self._tensor(pos)  # (T,)
        slot_mapping = slot_table[self._tensor(seq), pos_t]  # (T,) where the chunk's K/V go
        masked_prefix, masked_layers = None, frozenset()
        if is_full_model and not self.plan.independent_kv and self.plan.skip_layers:
            masked_layers = frozenset(self.plan.skip_layers)
            masked_prefix = self._tensor(
                [r.num_prompt_tokens - (1 if self.plan.boundary_handling else 0) for r in reqs]
            )
        attn = ExtendAttention(
            self.kv_cache.k,
            self.kv_cache.v,
            slot_mapping,
            slot_table,
            self._tensor(context_lens),
            masked_prefix,
            masked_layers,
            cu_seqlens=cu,
        )
        starts = [r.num_computed_tokens for r in reqs]
        return (
            self._tensor(ids),
            mm_inputs.step_positions([r.images for r in reqs], starts, num_tokens, pos_t, self.is_mrope),
            attn,
        )

    @torch.inference_mode()
    def recompute(self, reqs: list[Request], num_tokens: list[int]) -> None:
        """Re-run ``num_tokens[i]`` full-model positions of each preempted request (no plan: every
        layer, as the decode steps that first computed them); their K/V land in the blocks, nothing
        is sampled."""
        if not reqs:
            return
        ids, pos, attn = self.chunk_inputs(reqs, num_tokens, is_full_model=True)
        hidden = self.model(
            ids,
            pos,
            attn,
            vision=mm_inputs.step_vision([r.images for r in reqs], [r.num_computed_tokens for r in reqs], num_tokens),
        )
        if any(r.prompt_logprobs is not None for r in reqs):  # prompt scoring: these are its positions
            prompt_logprobs.score_positions(self.model, hidden, reqs, [r.num_computed_tokens for r in reqs], num_tokens)
        for req, n in zip(reqs, num_tokens):
            req.num_computed_tokens += n

    @torch.inference_mode()
    def mixed(
        self, decode: list[Request], chunks: list[Request], num_tokens: list[int]
    ) -> tuple[list[Request], list[int]]:
        """One chunked-prefill step; returns the requests that got a token and their tokens.

        Those are the decode rows and, only without boundary handling (the ablation), each request
        whose chunk ends its prompt: the pruned pass then samples its first token, as ``prefill`` does.
        """
        if not chunks:
            return (decode, self.decode(decode)) if decode else ([], [])
        ids, pos, attn = self.chunk_inputs(chunks, num_tokens)
        d = len(decode)
        vision = mm_inputs.step_vision(
            [r.images for r in chunks], [r.num_computed_tokens for r in chunks], num_tokens, first_row=d
        )
        for req, n in zip(chunks, num_tokens):
            # Before the decode rows' inputs: a request whose chunk ends its prefix is also a decode
            # row of this step (its boundary token at position N-1, see scheduler.py).
            req.num_computed_tokens += n
        if decode:
            d_ids, d_pos, d_attn = self.decode_inputs(decode)
            ids, pos, attn = torch.cat([d_ids, ids]), mm_inputs.join_positions(d_pos, pos), MixedAttention(d_attn, attn)
        hidden = self.model(ids, pos, attn, plan=self.plan, num_full_rows=d, vision=vision)  # (T, hidden)
        rows, reqs = list(range(d)), list(decode)
        end = d
        for req, n in zip(chunks, num_tokens):
            end += n
            # A preempted request re-running its prompt already has this token.
            if (
                not self.plan.boundary_handling
                and req.num_computed_tokens == req.num_prompt_tokens
                and not req.output_token_ids
            ):
                rows.append(end - 1)
                reqs.append(req)
        for req in decode:
            req.num_computed_tokens += 1
        if not rows:
            return [], []
        logits = self.model.compute_logits(hidden[rows])
        return reqs, sample_requests(logits, reqs, self.eos_token_ids)
