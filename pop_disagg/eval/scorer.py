"""Teacher-forced scoring and greedy decoding under a prefill method, on the engine's own pieces.

A ``Method`` says how a prompt is encoded (the POP plan, with its ablation switches, or a static
plan) and how the tokens after it run (the full model, or the statically pruned one). The
``CachedScorer`` runs it with the engine's real code: ``CausalLM.forward`` with the plan for the
prompt (K/V to a ``PrefillAttention`` sink that writes a ``KVCache``), then the full model over
that paged cache for everything after the prompt.

After the prompt, several tokens of a sequence run in one forward through ``ExtendAttention``
(``models/attention.py``): all of the call's K/V are stored before any token attends, and token
``j`` sees keys up to its own position only, so the result equals ``j`` successive one-token
``PagedAttention`` decode steps (tested against ``ModelRunner.decode_logits``). The cache uses
block size 1 so that forks (the choices of a multiple-choice question) can share a prompt's slots
and append their own.

POP scoring for prompt ``x_1..x_N`` and continuation ``c_1..c_M`` (paper Sec. 3):
* boundary handling on: pruned pass over ``x_1..x_{N-1}``; ``x_N, c_1..c_{M-1}`` through the full
  model attending to that cache (row 0 is the first generated token's distribution);
* off (ablation): pruned pass over ``x_1..x_N``, the first token from its last hidden state;
  ``c_1..c_{M-1}`` through the full model;
* independent K/V off (ablation): the skipped layers' rows for the pruned positions are masked;
* static pruning: the same layers are identities in both stages, so no K/V exist for them at all.

Image prompts (a vision-language model): a prompt may come with its encoded images
(``multimodal.PromptImages``, made once per prompt by the vision encoder, which no method prunes).
The prompt pass then runs them as the engine's prefill does (``engine/mm_inputs.py``: features in
the placeholder rows, Qwen-VL's multimodal positions, Gemma-3's two-way image attention), and
every position after the prompt takes the prompt's multimodal offset, as the engine's decode steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from ..engine import mm_inputs
from ..engine.kv_cache import BlockManager, KVCache
from ..models.attention import ExtendAttention
from ..models.decoder import CausalLM
from ..models.multimodal import PromptImages
from ..pop.plan import PrunePlan

# New tokens per extend forward (bounds activations; the key gather is per sequence).
MAX_TOKENS_PER_FORWARD = 512
# Rows per logits chunk: Gemma-3's 262k vocabulary makes (rows, vocab) float32 large.
MAX_LOGIT_ROWS = 64


def prompt_pass(arch, images: list[PromptImages | None], counts: list[int], pos: torch.Tensor, sink):
    """(positions, attention, image rows) of one prompt pass over whole prompts of ``counts``
    tokens back to back (``pos``: their (T,) positions), as the engine's prefill builds them."""
    cu = [0]
    for n in counts:
        cu.append(cu[-1] + n)
    starts = [0] * len(counts)
    attn = mm_inputs.prefill_attention(images, counts, cu, sink, arch.vision_family == "gemma3")
    positions = mm_inputs.step_positions(images, starts, counts, pos, arch.mrope_section is not None)
    return positions, attn, mm_inputs.step_vision(images, starts, counts)


class Method(BaseModel):
    """One way of running a model, compared against the full model."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    group: str  # "full" | "pop" | "ablation" | "static" | "corrected" (table sections, plots)
    plan: PrunePlan  # prefill plan (empty for the full model)
    is_static: bool = False  # the plan's layers are skipped after the prompt too (ShortGPT-style)
    has_kv_correction: bool = False  # skipped layers' K/V from least-squares-fitted projections
    note: str = ""

    @property
    def decode_plan(self) -> PrunePlan | None:
        # Static pruning: identities with no K/V at all (independent_kv off means nothing is stored).
        if not self.is_static:
            return None
        return self.plan.model_copy(update={"independent_kv": False, "boundary_handling": True})

    @property
    def boundary_handling(self) -> bool:
        return self.is_static or self.plan.boundary_handling


@dataclass
class Seq:
    """One sequence's cached positions (flat slots, one per position) and ablation state."""

    slots: list[int] = field(default_factory=list)
    num_hidden_prefix: int = 0  # leading positions the skipped layers hold no K/V for
    position_offset: int = 0  # after an image prompt: Qwen-VL's multimodal offset of later positions


@dataclass
class ContinuationScore:
    token_logprobs: torch.Tensor  # (M,) log P(c_i | ...) float32
    argmax: torch.Tensor  # (M,) most likely token at each continuation position
    first_logprobs: torch.Tensor | None  # (V,) first continuation token's distribution
    greedy_ids: list[int] | None = None  # free-running greedy tokens after the prompt


class CachedScorer:
    """Prefill under a method, then extend/fork/decode over a block-size-1 ``KVCache``."""

    def __init__(self, model: CausalLM, max_tokens: int, prefill_models: dict[str, CausalLM] | None = None):
        self.model = model
        # Methods whose prompt pass needs another instance (the K/V-corrected prefill-only model).
        self.prefill_models = prefill_models or {}
        self.blocks = BlockManager(max_tokens, 1)
        self.kv_cache = KVCache(model.arch, max_tokens, 1, model.dtype, model.device)

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.model.device)

    # ---- low level ------------------------------------------------------------------------------
    @torch.inference_mode()
    def open(
        self, prefixes: list[list[int]], method: Method, images: list[PromptImages | None] | None = None
    ) -> tuple[list[Seq], torch.Tensor | None]:
        """Encode each prefix with the method's prompt pass (``images``: each prefix's encoded
        images, None for a text one). Returns the sequences and, when the method takes the first
        token from the pruned pass, their last hidden states (B, H)."""
        plan = method.decode_plan if method.is_static else method.plan
        masked = not method.is_static and not plan.independent_kv and bool(plan.skip_layers)
        images = images or [None] * len(prefixes)
        seqs = [
            Seq(self.blocks.allocate(len(p)), len(p) if masked else 0, im.mrope_delta if im is not None else 0)
            for p, im in zip(prefixes, images)
        ]
        live = [(s, p, im) for s, p, im in zip(seqs, prefixes, images) if p]  # an empty prefix has nothing to encode
        if not live:
            return seqs, None
        ids, pos, slots, cu = [], [], [], [0]
        for s, p, _ in live:
            ids += p
            pos += range(len(p))
            slots += s.slots
            cu.append(cu[-1] + len(p))
        slot_mapping = self._tensor(slots)
        sink = lambda layer, k, v: self.kv_cache.write(layer, slot_mapping, k, v)  # noqa: E731
        model = self.prefill_models.get(method.name, self.model)
        positions, attn, vision = prompt_pass(
            self.model.arch, [im for _, _, im in live], [len(p) for _, p, _ in live], self._tensor(pos), sink
        )
        hidden = model(self._tensor(ids), positions, attn, plan=None if plan.is_empty else plan, vision=vision)
        if method.boundary_handling:
            return seqs, None
        if len(live) != len(seqs):
            raise ValueError("without boundary handling every prompt needs at least one token")
        return seqs, hidden[[c - 1 for c in cu[1:]]]

    @torch.inference_mode()
    def extend(self, seqs: list[Seq], token_lists: list[list[int]], method: Method, commit: bool) -> list[torch.Tensor]:
        """Run ``token_lists[i]`` after ``seqs[i]``'s cache (full model, or the static plan).

        Returns each list's final hidden states (m_i, H). ``commit`` appends the new positions to the
        sequences; otherwise they are discarded, so one sequence may appear several times (forks).
        """
        if commit and len({id(s) for s in seqs}) != len(seqs):
            raise ValueError("a sequence may be extended only once per committed call")
        plan = method.decode_plan
        masked_layers = frozenset(method.plan.skip_layers) if any(s.num_hidden_prefix for s in seqs) else frozenset()
        new_slots = [self.blocks.allocate(len(t)) for t in token_lists]
        # Items (sequence + its new tokens) are batched up to MAX_TOKENS_PER_FORWARD new tokens.
        chunks, cur, size = [], [], 0
        for i, toks in enumerate(token_lists):
            if cur and size + len(toks) > MAX_TOKENS_PER_FORWARD:
                chunks.append(cur)
                cur, size = [], 0
            cur.append(i)
            size += len(toks)
        if cur:
            chunks.append(cur)
        hidden_rows = []
        try:
            for chunk in chunks:
                chunk = [i for i in chunk if token_lists[i]]
                if not chunk:
                    continue
                table = [seqs[i].slots + new_slots[i] for i in chunk]
                width = max(len(t) for t in table)
                cu = [0]
                for i in chunk:
                    cu.append(cu[-1] + len(token_lists[i]))
                attn = ExtendAttention(
                    self.kv_cache.k,
                    self.kv_cache.v,
                    slot_mapping=self._tensor([s for i in chunk for s in new_slots[i]]),
                    slot_table=self._tensor([t + [0] * (width - len(t)) for t in table]),  # padding is masked
                    context_lens=self._tensor([len(t) for t in table]),
                    masked_prefix=self._tensor([seqs[i].num_hidden_prefix for i in chunk]) if masked_layers else None,
                    masked_layers=masked_layers,
                    cu_seqlens=cu,
                )
                ids = self._tensor([t for i in chunk for t in token_lists[i]])
                pos = self._tensor(
                    [
                        len(seqs[i].slots) + j + seqs[i].position_offset
                        for i in chunk
                        for j in range(len(token_lists[i]))
                    ]
                )
                hidden_rows.append(self.model(ids, pos, attn, plan=plan))
        except BaseException:
            for s in new_slots:
                self.blocks.free(s)
            raise
        hidden = torch.cat(hidden_rows) if hidden_rows else torch.empty(0, self.model.arch.hidden_size)
        out = list(hidden.split([len(t) for t in token_lists]))
        if commit:
            for s, n in zip(seqs, new_slots):
                s.slots += n
        else:
            for n in new_slots:
                self.blocks.free(n)
        return out

    def close(self, seqs: list[Seq]) -> None:
        for s in seqs:
            self.blocks.free(s.slots)
            s.slots = []

    # ---- high level -----------------------------------------------------------------------------
    def _start(self, prompts: list[list[int]], method: Method, images: list[PromptImages | None] | None = None):
        """Open the prompts; return (seqs, first-token hidden or None, tokens still to feed)."""
        if any(len(p) < 1 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if method.boundary_handling:
            seqs, _ = self.open([p[:-1] for p in prompts], method, images)
            return seqs, None, [[p[-1]] for p in prompts]
        seqs, last = self.open(prompts, method, images)
        return seqs, last, [[] for _ in prompts]

    @torch.inference_mode()
    def score(
        self,
        prompts: list[list[int]],
        continuations: list[list[int]],
        method: Method,
        keep_first: bool = False,
        greedy_tokens: int = 0,
        images: list[PromptImages | None] | None = None,
    ) -> list[ContinuationScore]:
        """Teacher-forced log-probabilities of each continuation after its prompt (and its images);
        with ``greedy_tokens``, also free-running greedy tokens from the same prompt cache."""
        seqs, first_hidden, pending = self._start(prompts, method, images)
        try:
            feed = [pend + c[:-1] for pend, c in zip(pending, continuations)]
            hidden = self.extend(seqs, feed, method, commit=False)
            greedy = (
                self._decode_greedy(seqs, first_hidden, pending, method, greedy_tokens, frozenset())
                if greedy_tokens
                else None
            )
        finally:
            self.close(seqs)
        out = []
        for b, (h, cont) in enumerate(zip(hidden, continuations)):
            if first_hidden is not None:
                h = torch.cat([first_hidden[b : b + 1], h])
            lp_rows, am_rows, first = [], [], None
            targets = torch.tensor(cont, dtype=torch.long)
            for a in range(0, len(cont), MAX_LOGIT_ROWS):
                lp = F.log_softmax(self.model.compute_logits(h[a : a + MAX_LOGIT_ROWS]), dim=-1).cpu()
                if a == 0 and keep_first:
                    first = lp[0].clone()
                lp_rows.append(lp.gather(1, targets[a : a + MAX_LOGIT_ROWS, None])[:, 0])
                am_rows.append(lp.argmax(-1))
            out.append(ContinuationScore(torch.cat(lp_rows), torch.cat(am_rows), first, greedy[b] if greedy else None))
        return out

    @torch.inference_mode()
    def choice_logprobs(
        self, contexts: list[list[int]], choices: list[list[list[int]]], method: Method
    ) -> list[list[float]]:
        """Sum of log P(choice tokens | context) for every choice of every context; the choices of
        one context fork its prompt cache (one prompt pass per context, one extend for all)."""
        seqs, first_hidden, pending = self._start(contexts, method)
        items = [(b, c) for b, cs in enumerate(choices) for c in cs]
        try:
            hidden = self.extend(
                [seqs[b] for b, _ in items], [pending[b] + c[:-1] for b, c in items], method, commit=False
            )
        finally:
            self.close(seqs)
        flat = []
        for (b, c), h in zip(items, hidden):
            if first_hidden is not None:
                h = torch.cat([first_hidden[b : b + 1], h])
            lp = F.log_softmax(self.model.compute_logits(h), dim=-1)
            flat.append(float(lp.gather(1, torch.tensor(c, device=lp.device)[:, None]).sum()))
        out, i = [], 0
        for cs in choices:
            out.append(flat[i : i + len(cs)])
            i += len(cs)
        return out

    @torch.inference_mode()
    def greedy(
        self,
        prompts: list[list[int]],
        method: Method,
        max_new_tokens: int,
        stop_ids: set[int] | frozenset = frozenset(),
        images: list[PromptImages | None] | None = None,
    ) -> list[list[int]]:
        """Free-running greedy decoding, all prompts (and their images) as one batch of one-token steps."""
        seqs, first_hidden, pending = self._start(prompts, method, images)
        try:
            return self._decode_greedy(seqs, first_hidden, pending, method, max_new_tokens, stop_ids)
        finally:
            self.close(seqs)

    def _decode_greedy(self, seqs, first_hidden, pending, method, max_new_tokens, stop_ids) -> list[list[int]]:
        outs: list[list[int]] = [[] for _ in seqs]
        if first_hidden is not None:
            nxt = self.model.compute_logits(first_hidden).argmax(-1).tolist()
        else:
            hidden = self.extend(seqs, pending, method, commit=True)
            nxt = self.model.compute_logits(torch.stack([h[-1] for h in hidden])).argmax(-1).tolist()
        live = list(range(len(seqs)))
        for step in range(max_new_tokens):
            for b, t in zip(live, nxt):
                outs[b].append(t)
            live_nxt = [(b, t) for b, t in zip(live, nxt) if t not in stop_ids]
            if step == max_new_tokens - 1 or not live_nxt:
                break
            live = [b for b, _ in live_nxt]
            hidden = self.extend([seqs[b] for b in live], [[t] for _, t in live_nxt], method, commit=True)
            nxt = self.model.compute_logits(torch.cat(hidden)).argmax(-1).tolist()
        return outs
