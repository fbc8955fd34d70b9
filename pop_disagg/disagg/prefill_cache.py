"""The prefill worker's prefix cache: every layer's K/V of the full prompt blocks it encoded.

A prefill worker holds no paged cache for decoding; this one keeps what it would send again, so a
shared system prompt is encoded once per worker. For each full block of an encoded prefix it
keeps the K/V of *every* layer: kept layers' from their attention, skipped layers' from their own
K/V projections (POP's independent K/V), i.e. exactly the K/V the worker ships. Blocks are named
as the decode worker names them (``prefill_block_hashes`` under the task's ``PrefixKey``: model,
plan, K/V correction), so equal tokens encoded under another plan never match. The bookkeeping is
the engine's ``BlockManager`` (reference counts, an LRU of evictable blocks) over a pool shaped
like the engine's ``KVCache``.

A prefill task's life in it (``PrefillWorker`` calls these under its lock; only the pool's
tensors are written outside it, into blocks the task holds):

    start    the longest cached run of the prefix's blocks is taken (capped so that at least one
             token is left to encode, which keeps every task a forward pass; with images, named
             with their digests too and capped by ``ImageKeys.resumable``) and fresh blocks are
             allocated for its other full blocks, when free (else those are not cached);
    kv/write the kept layers' K/V of the hits seed the task's attention buffers, every layer's K/V
             of hits the decode worker lacks is read for the wire, and what the pass computes for
             positions of the task's blocks is written in;
    finish   after the last chunk: its new blocks are published and its references dropped (they
             become evictable); after an abort or a failed pass nothing is published.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..engine.kv_cache import BlockManager, KVCache, PrefixKey, prefill_block_hashes
from ..models.arch import ModelArch
from ..models.multimodal import ImageKeys


@dataclass
class CachedPrefix:
    """One task's blocks in the cache: the hits first, then its own (published at ``finish``)."""

    block_table: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # names of its full blocks
    num_hit_blocks: int = 0

    def num_hit_tokens(self, block_size: int) -> int:
        return self.num_hit_blocks * block_size


class PrefillCache:
    def __init__(self, arch: ModelArch, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        self.blocks = BlockManager(num_blocks, block_size)
        self.pool = KVCache(arch, num_blocks, block_size, dtype, device)
        self.block_size = block_size
        self.num_queried_tokens = 0  # prefix tokens looked up
        self.num_hit_tokens = 0  # of those, found cached

    def start(self, prefix_ids: list[int], key: PrefixKey, images: ImageKeys | None = None) -> CachedPrefix:
        bs = self.block_size
        hashes = prefill_block_hashes(prefix_ids, key, bs, images)
        hits = []
        for h in hashes[: (len(prefix_ids) - 1) // bs]:  # at least one token left to encode
            block = self.blocks.cached_block(h)
            if block is None:
                break
            hits.append(block)
        if images is not None:
            hits = hits[: images.resumable(len(hits) * bs) // bs]
        self.blocks.take(hits)
        num_new = len(hashes) - len(hits)
        fresh = self.blocks.allocate_blocks(num_new) if num_new <= self.blocks.num_free_blocks else []
        self.num_queried_tokens += len(prefix_ids)
        self.num_hit_tokens += len(hits) * bs
        return CachedPrefix(hits + fresh, hashes, len(hits))

    # ``kv`` and ``write`` take the task's block table as it was when its step began: an abort may
    # release the task meanwhile, but its blocks are handed out again only by a later step.
    def kv(self, layer: int, block_table: list[int], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s K/V of cached positions ``start..end-1``: two (end - start, Hkv, D)."""
        slots = torch.tensor(self.blocks.slots(block_table, start, end), device=self.pool.k.device)
        return self.pool.read(layer, slots)

    def write(self, layer: int, block_table: list[int], start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """K/V (n, Hkv, D) of positions ``start..start+n-1``; those past the task's blocks are not kept."""
        end = min(start + k.shape[0], len(block_table) * self.block_size)
        if end <= start:
            return
        slots = torch.tensor(self.blocks.slots(block_table, start, end), device=self.pool.k.device)
        self.pool.write(layer, slots, k[: end - start], v[: end - start])

    def finish(self, entry: CachedPrefix, publish: bool) -> None:
        if publish:
            for index in range(entry.num_hit_blocks, len(entry.block_table)):
                self.blocks.cache(entry.block_table[index], entry.hashes[index])
        self.blocks.free(entry.block_table)
        entry.block_table = []
