"""Attention backends: where a layer's new K/V go and what its queries attend to.

The decoder calls two methods per layer, ``store(layer, k, v)`` and ``attend(layer, q, k, v, ...)``,
and stays ignorant of caches. Two backends cover every stage POP has:

* ``PrefillAttention``: a batch of fresh sequences (no cached context), flattened to ``T`` tokens.
  Queries attend causally among their own sequence. New K/V go to a sink callback: the engine's
  sink writes them into paged blocks; the disaggregated prefill worker's sink ships them to the
  decode worker layer by layer; calibration passes no sink at all.
* ``PagedAttention``: one-token decode steps over a paged KV cache (the decode worker's only kind of
  step under POP: the boundary token ``N`` and every generated token).

Chunked prefill adds three: ``ChunkedPrefillAttention`` (prompt chunks whose earlier chunks' K/V
sit in per-sequence buffers: the disaggregated prefill worker), ``ExtendAttention`` (several new
tokens per sequence over the paged cache: a prompt chunk, or teacher-forced scoring) and
``MixedAttention`` (an engine step of decode rows through ``PagedAttention``, then prompt-chunk rows
through ``ExtendAttention``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from . import cpu_blas

KVSink = Callable[[int, torch.Tensor, torch.Tensor], None]


# The paged cache is head-major: (L, Hkv, num_blocks, block_size, D) per K and V, i.e. per layer and
# head one run of slots. Gathering a batch's context then gives (Hkv, B, S, D) contiguous, which a
# decode step's attention reads as one batched GEMM per head group; from the slot-major layout the
# same gather gave (B, S, Hkv, D), and attention over its (B, Hkv, S, D) view ran 1.1-2.2x slower
# on a CPU (SDPA copies or strides through it; benchmarks/results/decode/README.md).


def cache_shape(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple:
    return (num_layers, num_kv_heads, num_blocks, block_size, head_dim)


def flat_layers(cache: torch.Tensor) -> torch.Tensor:
    """(L, Hkv, num_blocks, block_size, D) -> (L, Hkv, num_slots, D), a view."""
    nl, hkv, nb, bs, d = cache.shape
    return cache.view(nl, hkv, nb * bs, d)


def write_slots(
    k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Write (T, Hkv, D) K/V at flat slots (T,) of a (L, Hkv, num_blocks, block_size, D) cache."""
    _write_flat(flat_layers(k_cache)[layer], flat_layers(v_cache)[layer], slots, k, v)


def read_slots(cache: torch.Tensor, layer: int, slots: torch.Tensor) -> torch.Tensor:
    """(T, Hkv, D) of ``layer`` at flat ``slots`` (T,), a copy."""
    return flat_layers(cache)[layer].index_select(1, slots).transpose(0, 1)


def _write_flat(
    k_dst: torch.Tensor, v_dst: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Write (T, Hkv, D) K/V at ``slots`` of one layer's flat (Hkv, num_slots, D) cache views."""
    dt = k_dst.dtype
    k_dst.index_copy_(1, slots, (k if k.dtype == dt else k.to(dt)).transpose(0, 1))
    v_dst.index_copy_(1, slots, (v if v.dtype == dt else v.to(dt)).transpose(0, 1))


def _sdpa(q, k, v, mask, scale, is_causal=False):
    # q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D). Without autograd, grouped-query attention reads K/V
    # as they are (``enable_gqa``, as Transformers does for an unmasked prefill) instead of a
    # repeat_interleave copy of both per layer; calibration differentiates through here, and the
    # math backend that needs masks + grads on CPU takes the expanded K/V.
    if k.shape[1] != q.shape[1] and not torch.is_grad_enabled():
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=True
        )
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


# Query rows per block of ``causal_blocks``: the blocks skip the keys above the diagonal (62% of a
# 512-token prompt's score FLOPs at 128, 53% at 2048) while each GEMM keeps 128 x (H / Hkv) rows.
# SmolLM2's shapes, one Zen 5 thread: 4.2 ms against SDPA's 8.2 ms at 512 tokens, 49 vs 77 ms at
# 2048; 64 and 256 were slower at both lengths.
CAUSAL_BLOCK = 128


def takes_causal_blocks(q: torch.Tensor, num_keys: int, window: int | None) -> bool:
    """Whether ``causal_blocks`` runs this attention: CPU float32 under oneDNN GEMMs, no autograd
    (calibration differentiates through SDPA), every key inside the sliding window if any."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and not torch.is_grad_enabled()
        and (window is None or num_keys <= window)
        and cpu_blas.active() == "onednn"
    )


def causal_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal grouped-query attention of one sequence on a CPU, from oneDNN GEMMs.

    q: (n, H, D), the last n of the sequence's S positions; k, v: (Hkv, S, D), head-major (any
    strides) -> (n, H, D). Query ``i`` sees keys ``0 .. S - n + i``. Per head group, the g = H / Hkv
    query heads of a block of ``CAUSAL_BLOCK`` positions are the rows of one scores GEMM against
    the keys up to the block's end, then softmax and one GEMM against the values: torch's CPU flash
    kernel for SDPA runs its head-dim-64 GEMMs at ~40 GFLOP/s, oneDNN at ~150 (``cpu_blas.mm_nt``).
    """
    n, h, d = q.shape
    hkv, s = k.shape[0], k.shape[1]
    g, start = h // hkv, s - n
    # One pass: scaled, and grouped so that a block's g heads per position are contiguous rows.
    qh = torch.empty(hkv, n, g, d, dtype=q.dtype)
    torch.mul(q.view(n, hkv, g, d).permute(1, 0, 2, 3), scale, out=qh)
    # Keys as (Hkv, S, D), values as (Hkv, D, S), contiguous: a block's keys are then a run of rows,
    # and its values (``vt[j, :, :end]``, copied by ``mm_nt``) one small copy; oneDNN only takes
    # contiguous operands at speed.
    kh = k.contiguous()
    vt = v.transpose(1, 2).contiguous()
    out = torch.empty(n, hkv, g, d, dtype=q.dtype)
    bq = CAUSAL_BLOCK
    above = torch.full((bq, bq), float("-inf")).triu_(1)[:, None, :]  # (bq, 1, bq): key after query
    for a in range(0, n, bq):
        b = min(n, a + bq)
        m, end = b - a, start + b
        for j in range(hkv):
            scores = cpu_blas.mm_nt(qh[j, a:b].view(m * g, d), kh[j, :end])  # (m * g, end)
            scores.view(m, g, end)[:, :, end - m :].add_(above[:m, :, :m])
            probs = torch.softmax(scores, dim=-1)
            out[a:b, j] = cpu_blas.mm_nt(probs, vt[j, :, :end]).view(m, g, d)
    return out.view(n, h, d)


def _causal_mask(num_keys: int, num_queries: int, window: int | None, device) -> torch.Tensor:
    """(n, S) visibility of the last ``num_queries`` of ``num_keys`` positions: key j from query i
    iff j <= i and, with a sliding window, i - w < j (as Transformers defines it)."""
    i = torch.arange(num_keys - num_queries, num_keys, device=device)[:, None]  # (n, 1) query positions
    j = torch.arange(num_keys, device=device)[None, :]  # (1, S) key positions
    mask = j <= i
    return mask & (j > i - window) if window is not None else mask


@dataclass
class PrefillAttention:
    """Causal attention within each sequence of a flattened batch; K/V handed to ``sink``."""

    cu_seqlens: list[int]  # B+1 offsets into the T flattened tokens
    sink: KVSink | None = None
    stream_kv: bool = False  # the sink ships each layer at once: skipped runs project layer by layer

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.sink is not None:
            self.sink(layer, k, v)

    def attend(self, layer, q, k, v, window: int | None, scale: float) -> torch.Tensor:
        # q: (T, H, D), k/v: (T, Hkv, D) -> (T, H, D)
        lens = [b - a for a, b in zip(self.cu_seqlens[:-1], self.cu_seqlens[1:])]
        if len(set(lens)) == 1:  # equal lengths: one batched call
            n = lens[0]
            out = self._attend_one(
                q.view(-1, n, *q.shape[1:]), k.view(-1, n, *k.shape[1:]), v.view(-1, n, *v.shape[1:]), window, scale
            )
            return out.reshape(q.shape)
        outs = []
        for a, b in zip(self.cu_seqlens[:-1], self.cu_seqlens[1:]):
            outs.append(self._attend_one(q[None, a:b], k[None, a:b], v[None, a:b], window, scale)[0])
        return torch.cat(outs, dim=0)

    @staticmethod
    def _attend_one(q, k, v, window, scale):
        # (B, n, H, D) -> (B, n, H, D)
        if takes_causal_blocks(q, q.shape[1], window):
            return torch.stack(
                [causal_blocks(q[i], k[i].transpose(0, 1), v[i].transpose(0, 1), scale) for i in range(q.shape[0])]
            )
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        n = q.shape[2]
        if window is None or n <= window:
            out = _sdpa(q, k, v, None, scale, is_causal=True)
        else:
            out = _sdpa(q, k, v, _causal_mask(n, n, window, q.device), scale)
        return out.transpose(1, 2)


@dataclass
class ChunkedPrefillAttention(PrefillAttention):
    """Prompt chunks of sequences whose earlier chunks' K/V sit in per-sequence buffers, not in a
    paged cache (the disaggregated prefill worker has none; it ships K/V and keeps only these).

    ``buffers[i]`` maps a layer to the (start, Hkv, D) K/V of sequence ``i``'s earlier positions
    (its rows are positions ``start..``), and when ``keep[i]`` (more chunks follow) the layer's
    buffer grows by this chunk. Only layers that attend (kept under the plan) are buffered: nobody
    attends to a skipped layer during prefill.
    """

    buffers: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = None
    keep: list[bool] = None

    def attend(self, layer, q, k, v, window: int | None, scale: float) -> torch.Tensor:
        outs = []
        for i, (a, b) in enumerate(zip(self.cu_seqlens[:-1], self.cu_seqlens[1:])):
            keys, vals = k[a:b], v[a:b]  # (n, Hkv, D)
            if layer in self.buffers[i]:
                old_k, old_v = self.buffers[i][layer]
                keys, vals = torch.cat([old_k, keys]), torch.cat([old_v, vals])  # (start + n, Hkv, D)
            if self.keep[i]:
                self.buffers[i][layer] = (keys, vals)
            if keys.shape[0] == b - a:  # first chunk: plain causal attention
                outs.append(self._attend_one(q[None, a:b], keys[None], vals[None], window, scale)[0])
                continue
            if takes_causal_blocks(q, keys.shape[0], window):
                outs.append(causal_blocks(q[a:b], keys.transpose(0, 1), vals.transpose(0, 1), scale))
                continue
            mask = _causal_mask(keys.shape[0], b - a, window, q.device)  # this chunk's queries over all its keys
            out = _sdpa(
                q[a:b].transpose(0, 1)[None], keys.transpose(0, 1)[None], vals.transpose(0, 1)[None], mask, scale
            )  # (1, H, n, D)
            outs.append(out[0].transpose(0, 1))
        return torch.cat(outs, dim=0)


@dataclass
class PagedAttention:
    """One query token per sequence attending to its whole context in paged KV blocks.

    ``k_cache``/``v_cache``: (num_layers, Hkv, num_blocks, block_size, D) (``cache_shape``).
    ``slot_mapping``: (B,) flat slot of each new token. ``slot_table``: (B, S) flat slot of every
    context position (padded). ``context_lens``: (B,) keys visible including the new token.
    ``masked_prefix``: research ablation "without independent K/V": in ``masked_layers``, the first
    ``masked_prefix[b]`` positions of sequence ``b`` hold no K/V and are masked out.
    """

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor
    slot_table: torch.Tensor
    context_lens: torch.Tensor
    masked_prefix: torch.Tensor | None = None
    masked_layers: frozenset[int] = frozenset()
    dense: bool = False  # every row sees all S columns of slot_table (no padding): no mask needed

    def __post_init__(self):
        # Positions as (B, M, 1) queries x (1, 1, S) keys; here M = 1 query per sequence.
        s = self.slot_table.shape[1]
        self._key_pos = torch.arange(s, device=self.slot_table.device)[None, None, :]  # (1, 1, S)
        self._query_pos = (self.context_lens - 1)[:, None, None]  # (B, 1, 1)
        self._valid = self._key_pos <= self._query_pos  # (B, 1, S)
        self._masks: dict = {}
        # Per-step views and the flat slot list, made once for every layer. Per-op dispatch is
        # most of a small decode step's cost on a CPU (benchmarks/results/decode/README.md, "Decode speed").
        self._k_flat = flat_layers(self.k_cache)  # (L, Hkv, num_slots, D)
        self._v_flat = flat_layers(self.v_cache)
        self._flat_slots = self.slot_table.reshape(-1)

    def _mask(self, layer: int, window: int | None, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive float mask (B, 1, M, S), made once per step per kind of layer; None when nothing is masked.

        Float, not boolean: SDPA turns a boolean mask into this very tensor on every call (bitwise
        the same result), i.e. once per layer per step instead of once per step.
        """
        key = (window, layer in self.masked_layers, dtype)
        if key not in self._masks:
            if (
                self.dense
                and (window is None or self.slot_table.shape[1] <= window)
                and not (key[1] and self.masked_prefix is not None)
            ):
                self._masks[key] = None
                return None
            m = self._valid
            if window is not None:
                m = m & (self._key_pos > self._query_pos - window)
            if key[1] and self.masked_prefix is not None:
                m = m & (self._key_pos >= self.masked_prefix[:, None, None])
            self._masks[key] = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, float("-inf"))[
                :, None
            ]
        return self._masks[key]

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        _write_flat(self._k_flat[layer], self._v_flat[layer], self.slot_mapping, k, v)

    def _gather_head_major(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sequence's context K/V from its blocks -> two contiguous (Hkv, B, S, D) tensors."""
        b, s = self.slot_table.shape
        hkv, d = self._k_flat.shape[1], self._k_flat.shape[3]
        # index_select, not advanced indexing: the latter is ~100x slower on CPU for this gather.
        keys = self._k_flat[layer].index_select(1, self._flat_slots).view(hkv, b, s, d)
        vals = self._v_flat[layer].index_select(1, self._flat_slots).view(hkv, b, s, d)
        return keys, vals

    def _gather(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sequence's context K/V from its blocks -> two (B, Hkv, S, D) views."""
        keys, vals = self._gather_head_major(layer)
        return keys.transpose(0, 1), vals.transpose(0, 1)

    def attend(self, layer, q, k, v, window: int | None, scale: float) -> torch.Tensor:
        # q: (B, H, D); the new k/v were already stored, so everything comes from the cache.
        # Grouped-query attention without expanding K/V to H heads: the g = H / Hkv query heads of a
        # group are that group's rows, so on a CPU each head group is one (B, g, D) x (B, D, S) GEMM
        # over its contiguous (B, S, D) context, softmax, and one GEMM against V. SDPA's CPU kernel
        # with one query per sequence ran 1.1-2.2x slower than these three calls on the same data
        # (benchmarks/results/decode/README.md). On CUDA SDPA's kernels stay (CUDA graphs capture them).
        keys, vals = self._gather_head_major(layer)  # (Hkv, B, S, D)
        hkv, b, s, d = keys.shape
        mask = self._mask(layer, window, q.dtype)  # (B, 1, 1, S) or None
        if q.is_cuda:
            out = F.scaled_dot_product_attention(
                q.unsqueeze(2),
                keys.transpose(0, 1),
                vals.transpose(0, 1),
                attn_mask=mask,
                scale=scale,
                enable_gqa=hkv != q.shape[1],
            )
            return out.squeeze(2)  # (B, H, D)
        g = q.shape[1] // hkv
        qg = q.view(b, hkv, g, d).transpose(0, 1).reshape(hkv * b, g, d)  # (Hkv*B, g, D), a small copy
        scores = torch.bmm(qg, keys.view(hkv * b, s, d).transpose(1, 2)).mul_(scale)  # (Hkv*B, g, S)
        if mask is not None:
            scores.view(hkv, b, g, s).add_(mask.view(1, b, 1, s))
        out = torch.bmm(torch.softmax(scores, dim=-1), vals.view(hkv * b, s, d))  # (Hkv*B, g, D)
        return out.view(hkv, b, g, d).transpose(0, 1).reshape(b, hkv * g, d)  # (B, H, D)


@dataclass
class ExtendAttention(PagedAttention):
    """Several new tokens per sequence over the paged cache, each seeing its context up to itself.

    Used for teacher-forced scoring (``pop_disagg/eval``): equal to that many one-token
    ``PagedAttention`` steps (tested), with one key gather per sequence instead of one per token.
    The new tokens of sequence ``b`` are ``q[cu_seqlens[b]:cu_seqlens[b+1]]`` and occupy the last
    positions of its context: ``slot_table[b, :context_lens[b]]`` includes them.
    """

    cu_seqlens: list[int] = None

    def __post_init__(self):
        super().__post_init__()
        cu = torch.tensor(self.cu_seqlens, device=self.slot_table.device)
        num_new = cu[1:] - cu[:-1]  # (B,)
        self._seq = torch.repeat_interleave(torch.arange(len(num_new), device=cu.device), num_new)  # (T,)
        self._offset = torch.arange(int(cu[-1]), device=cu.device) - cu[:-1][self._seq]  # (T,)
        j = torch.arange(int(num_new.max()), device=cu.device)[None, :]  # (1, M)
        first = (self.context_lens - num_new)[:, None]
        # Padding queries (j >= num_new) reuse the last position so that no row is fully masked.
        self._query_pos = torch.minimum(first + j, (self.context_lens - 1)[:, None])[:, :, None]  # (B, M, 1)
        self._valid = self._key_pos <= self._query_pos  # (B, M, S)
        # One sequence on a GPU (a chunked prefill's usual step): its M new tokens are the last M
        # of its S keys, i.e. causal attention aligned at the lower right, which the flash kernels
        # take without a mask. With an (M, S) mask tensor the H200 picked a backend that cost
        # ~250 ms per chunk step at S = 8k, a new plan for every new S (benchmarks/results/gpu/README.md,
        # "Chunked prefill on an H200"). CPU keeps the mask (tests compare the two).
        self._lower_right = None
        if self.slot_table.shape[0] == 1 and self.masked_prefix is None and self.slot_table.is_cuda:
            self._lower_right = causal_lower_right(self.cu_seqlens[1] - self.cu_seqlens[0], self.slot_table.shape[1])

    def attend(self, layer, q, k, v, window: int | None, scale: float) -> torch.Tensor:
        # q: (T, H, D) -> padded (B, H, M, D); keys gathered once per sequence.
        keys, vals = self._gather(layer)
        if self._lower_right is not None and (window is None or self.slot_table.shape[1] <= window):
            return _sdpa(q.transpose(0, 1)[None], keys, vals, self._lower_right, scale)[0].transpose(0, 1)
        qp = q.new_zeros(self.slot_table.shape[0], self._query_pos.shape[1], *q.shape[1:])
        qp[self._seq, self._offset] = q
        out = _sdpa(qp.transpose(1, 2), keys, vals, self._mask(layer, window, q.dtype), scale)
        return out.transpose(1, 2)[self._seq, self._offset]  # (T, H, D)


@dataclass
class MixedAttention:
    """One chunked-prefill step: ``decode`` rows first (one token per running request), then the
    prompt-chunk rows of ``chunk``, flattened in that order to ``T`` tokens.

    Two backends rather than ``ExtendAttention`` for every row: that one pads each sequence's
    queries to the longest chunk, so a batch of decode rows beside a 512-token chunk would attend
    512 padded queries each. The decoder also needs the halves apart: under POP, chunk rows skip
    the plan's layers while decode rows run them (``CausalLM.forward``'s ``num_full_rows``).
    """

    decode: PagedAttention
    chunk: ExtendAttention

    def __post_init__(self):
        self.num_decode = self.decode.slot_mapping.shape[0]
        self._slot_mapping = torch.cat([self.decode.slot_mapping, self.chunk.slot_mapping])  # (T,)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        _write_flat(self.decode._k_flat[layer], self.decode._v_flat[layer], self._slot_mapping, k, v)

    def attend(self, layer, q, k, v, window: int | None, scale: float) -> torch.Tensor:
        # q: (T, H, D); both halves read their context (incl. the rows just stored) from the cache.
        d = self.num_decode
        out_decode = self.decode.attend(layer, q[:d], k[:d], v[:d], window, scale)  # (D, H, D)
        out_chunk = self.chunk.attend(layer, q[d:], k[d:], v[d:], window, scale)  # (T-D, H, D)
        return torch.cat([out_decode, out_chunk])
