"""Model runner: turns scheduled requests into tensors, runs the model, samples.

Owns the model, the KV cache tensors and the prune plan. Two kinds of step:

* ``prefill(reqs)``: the pruned pass over each prompt's first ``N-1`` tokens (all ``N`` without
  boundary handling, then it also samples the first token). K/V go straight into the requests'
  blocks through the prefill sink.
* ``decode(reqs)``: one token per request through the full model over the paged cache.
"""

from __future__ import annotations

import torch

from ..models.attention import PagedAttention, PrefillAttention
from ..models.decoder import CausalLM
from ..pop.plan import PrunePlan
from .kv_cache import BlockManager, KVCache
from .request import Request
from .sampling import sample


class ModelRunner:
    def __init__(self, model: CausalLM, kv_cache: KVCache, blocks: BlockManager, plan: PrunePlan):
        self.model = model
        self.kv_cache = kv_cache
        self.blocks = blocks
        self.plan = plan
        self.device = model.device

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def prefill(self, reqs: list[Request], num_tokens: list[int]) -> list[int] | None:
        """Encode ``num_tokens[i]`` prompt tokens of each request; returns sampled tokens only
        when the plan disables boundary handling (the pruned pass then predicts token N+1)."""
        ids, pos, slots, cu = [], [], [], [0]
        for req, n in zip(reqs, num_tokens):
            ids += req.prompt_token_ids[:n]
            pos += range(n)
            slots += self.blocks.slots(req.block_table, 0, n)
            cu.append(cu[-1] + n)
        slot_mapping = self._tensor(slots)
        attn = PrefillAttention(cu, sink=lambda layer, k, v: self.kv_cache.write(layer, slot_mapping, k, v))
        hidden = self.model(self._tensor(ids), self._tensor(pos), attn, plan=self.plan)
        for req, n in zip(reqs, num_tokens):
            req.num_computed_tokens = n
        if self.plan.boundary_handling:
            return None
        last = hidden[[c - 1 for c in cu[1:]]]
        return sample(self.model.compute_logits(last), [r.params for r in reqs], [r.generator for r in reqs])

    @torch.inference_mode()
    def decode_logits(self, reqs: list[Request]) -> torch.Tensor:
        ids = [r.next_input_token for r in reqs]
        pos = self._tensor([r.num_computed_tokens for r in reqs])  # (B,) position of the new token
        bs = self.blocks.block_size
        max_ctx = int(pos.max()) + 1
        max_blocks = -(-max_ctx // bs)
        # Block tables padded with block 0: positions past a request's context are masked anyway.
        table = self._tensor([(r.block_table + [0] * max_blocks)[:max_blocks] for r in reqs]).view(len(reqs), max_blocks)
        offs = torch.arange(max_ctx, device=self.device)
        slot_table = table[:, offs // bs] * bs + offs % bs  # (B, S)
        slot_mapping = slot_table.gather(1, pos[:, None])[:, 0]  # (B,) where the new K/V go
        masked_prefix, masked_layers = None, frozenset()
        if not self.plan.independent_kv and self.plan.skip_layers:
            # Ablation: skipped layers wrote no K/V for the pruned prompt positions.
            masked_layers = frozenset(self.plan.skip_layers)
            n_pruned = [r.num_prompt_tokens - (1 if self.plan.boundary_handling else 0) for r in reqs]
            masked_prefix = self._tensor(n_pruned)
        attn = PagedAttention(self.kv_cache.k, self.kv_cache.v, slot_mapping, slot_table, pos + 1, masked_prefix, masked_layers)
        hidden = self.model(self._tensor(ids), pos, attn)
        for r in reqs:
            r.num_computed_tokens += 1
        return self.model.compute_logits(hidden)

    def decode(self, reqs: list[Request]) -> list[int]:
        logits = self.decode_logits(reqs)
        return sample(logits, [r.params for r in reqs], [r.generator for r in reqs])
