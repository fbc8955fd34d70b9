"""The decode step with static shapes: bucketed, then CUDA-graph-captured (GPU) or compiled (CPU).

A decode step's shapes change every step (batch size ``B``, context ``S``), which defeats both
CUDA graphs and ``torch.compile``. ``BucketedDecode`` pads every step up to a bucket: ``B`` to the
next of ``1, 2, 4, 8, 16, 24, ...`` (nano-vllm's batch buckets) and ``S`` to a power-of-two number
of KV blocks, and runs one static-shape function per bucket:

* ``mode="cuda_graph"``: captured once per bucket into a CUDA graph over static input buffers and
  replayed (all buckets share one memory pool), as nano-vllm and vLLM do;
* ``mode="compile"``: ``torch.compile(dynamic=False)`` of the same function, one graph per bucket,
  for batch buckets up to ``CPU_COMPILE_MAX_BATCH`` only (larger steps run eagerly, unpadded):
  on the 2-core AVX2 CPU this was measured on (benchmarks/results/decode/README.md, "Compiled decode step"), the
  compiled step was 1.54x Transformers at batch 1 against 1.27x eager, but 0.51x at batch 16
  against ~1.0x eager, and each bucket took ~145 s to compile;
* ``mode="padded"``: the padded function run eagerly (CPU tests of the padding logic).

Padding is chosen so that it cannot change the real rows: a padding row repeats the last real
request (same token, position and slots), so the K/V it writes is the value that slot receives
anyway; padding key columns lie past every row's context and are masked. Each bucket is built
lazily, the first time a step needs it, with one log line.
"""

from __future__ import annotations

import logging

import torch

from ..models.attention import PagedAttention
from ..models.decoder import CausalLM
from .kv_cache import KVCache

log = logging.getLogger(__name__)


CPU_COMPILE_MAX_BATCH = 1  # see the module docstring: compiled CPU steps only paid at batch 1


def batch_buckets(max_num_seqs: int) -> list[int]:
    buckets = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs + 16, 8))
    return [b for b in buckets if b < max_num_seqs] + [max_num_seqs]


class BucketedDecode:
    def __init__(self, model: CausalLM, kv_cache: KVCache, max_num_seqs: int, mode: str):
        if mode not in ("cuda_graph", "compile", "padded"):
            raise ValueError(f"unknown decode mode {mode!r}")
        self.model, self.kv_cache, self.mode = model, kv_cache, mode
        self.buckets = batch_buckets(max_num_seqs)
        self._compiled = torch.compile(self._forward, dynamic=False) if mode == "compile" else None
        self._graphs: dict[tuple[int, int], tuple] = {}  # (b, s) -> (graph, static inputs, static logits)
        self._pool = None

    def _forward(self, ids, pos, slot_mapping, slot_table):
        attn = PagedAttention(self.kv_cache.k, self.kv_cache.v, slot_mapping, slot_table, pos + 1)
        return self.model.compute_logits(self.model(ids, pos, attn))

    def handles(self, batch: int) -> bool:
        """Whether a step of ``batch`` requests goes through this (compiled / graphed) path."""
        return self.mode != "compile" or batch <= CPU_COMPILE_MAX_BATCH

    def bucket(self, batch: int, context: int) -> tuple[int, int]:
        b = next(x for x in self.buckets if x >= batch)
        bs = self.kv_cache.block_size
        blocks = 1 << max(0, (-(-context // bs) - 1).bit_length())  # next power of two
        return b, blocks * bs

    def _pad(self, ids, pos, slot_mapping, slot_table, b: int, s: int):
        n, ctx = slot_table.shape
        rows = torch.cat([torch.arange(n, device=ids.device), ids.new_full((b - n,), n - 1)])  # repeat the last request
        table = slot_table.new_zeros(b, s)  # columns past the context are masked, any slot will do
        table[:, :ctx] = slot_table[rows]
        return ids[rows], pos[rows], slot_mapping[rows], table

    @torch.inference_mode()
    def __call__(self, ids, pos, slot_mapping, slot_table) -> torch.Tensor:
        """Inputs of ``B`` requests -> (B, vocab) logits, computed at the bucket's shape."""
        n = ids.shape[0]
        b, s = self.bucket(n, slot_table.shape[1])
        padded = self._pad(ids, pos, slot_mapping, slot_table, b, s)
        if self.mode == "padded":
            return self._forward(*padded)[:n]
        if self.mode == "compile":
            if (b, s) not in self._graphs:
                log.info("compiling the decode step for batch bucket %d, context %d (torch.compile)", b, s)
                self._graphs[(b, s)] = ()
            return self._compiled(*padded)[:n]
        if (b, s) not in self._graphs:
            try:
                self._capture(b, s, padded)
            except Exception as exc:  # noqa: BLE001 - a capture failure must cost speed, never the server
                # Captures cleanly on an H200; should an op that syncs with the host (or any other
                # capture error) appear, this engine decodes eagerly from then on instead of failing requests.
                log.warning(
                    "CUDA graph capture failed (%s: %s); decoding eagerly from now on (as --enforce-eager)",
                    exc.__class__.__name__,
                    exc,
                )
                self.mode = "padded"
                return self._forward(*padded)[:n]
        graph, inputs, logits = self._graphs[(b, s)]
        for buf, x in zip(inputs, padded):
            buf.copy_(x)
        graph.replay()
        return logits[:n]

    def _capture(self, b: int, s: int, example) -> None:
        log.info("capturing a CUDA graph of the decode step for batch bucket %d, context %d", b, s)
        inputs = tuple(x.clone() for x in example)
        # Warm up on a side stream (lazy initialisations must not land in the graph), then capture.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the decode worker's receiver thread may copy K/V into the cache meanwhile.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = self._forward(*inputs)
        self._pool = graph.pool()
        self._graphs[(b, s)] = (graph, inputs, logits)
