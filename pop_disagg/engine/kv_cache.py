"""Paged KV cache: block bookkeeping (plain Python) and the tensors it indexes.

``BlockManager`` is the one block allocator, with reference counts, and the prefix cache over it; it
never touches tensors, so the scheduler can use it on any host. A block is in exactly one state:

* free: no owner, no cached content;
* referenced (``ref_count > 0``): in the block table of one or more requests (several when they
  share a cached prefix);
* evictable: no owner but it holds a published full block (``cache``), kept in LRU order so a
  later request with the same prefix can take it back (``lookup`` + ``take``).

``allocate_blocks`` hands out free blocks first, then evicts the least recently released evictable
ones (their hash is forgotten); a referenced block is never handed out. Free and evictable blocks
together are what ``num_free_blocks`` reports: both can be allocated.

A cached block is named by ``block_hash(parent, token ids, key, images)``: the hash of the block
before it, its tokens, a key saying how its K/V were computed (the scheduler's plan key and the
positions the pruned prefill wrote, see ``scheduler.py``), so equal tokens computed differently
never match, and the content digests of the images whose placeholder tokens the block holds
(``ImageKeys``, as vLLM folds its multimodal hashes into the block hash): an image prompt's
placeholder ids are the same for every image of that size, the digest says which image it is.
Through the parent every later block carries the digest too, which also covers what the image
changes after it (Qwen-VL: the multimodal positions of the later text depend on its patch grid,
which the digest covers).

``KVCache`` owns the two tensors, head-major ``(num_layers, Hkv, num_blocks, block_size, D)``, allocated
once from a memory budget.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

from ..models.arch import ModelArch
from ..models.attention import cache_shape, read_slots, write_slots
from ..models.multimodal import ImageKeys
from ..pop.plan import PrunePlan


class OutOfBlocks(RuntimeError):
    pass


def block_hash(parent: bytes, token_ids: Sequence[int], key: bytes, images: bytes = b"") -> bytes:
    """Name of a full block: SHA-256 over its parent's name, its computation key, its token ids and
    the digests of the images it holds placeholders of (``ImageKeys.digests_between``; a cryptographic
    hash: one tenant cannot forge a collision to read another's K/V)."""
    return hashlib.sha256(parent + key + array("q", token_ids).tobytes() + images).digest()


def plan_cache_key(model: str, plan: PrunePlan, kv_correction: str | None = None) -> bytes:
    """What a prefill under ``plan`` writes, as bytes: the model, the skipped layers, the two
    ablation switches and the K/V correction (none in an engine: only prefill-only instances load
    one). Blocks are shared only between requests whose prefills had the same key."""
    text = (
        f"{model}|skip={','.join(map(str, plan.skip_layers))}|independent_kv={plan.independent_kv}"
        f"|boundary={plan.boundary_handling}|kv_correction={kv_correction}"
    )
    return hashlib.sha256(text.encode()).digest()


@dataclass(frozen=True)
class PrefixKey:
    """How a request's prefix K/V were computed, as the prefix cache names its blocks: the plan key
    (``plan_cache_key``) and whether that plan skips nothing (then prefill and decode write the same
    K/V and a block's key does not say which wrote it)."""

    plan: bytes
    is_full_model: bool

    def block(self, num_pruned: int) -> bytes:
        """The key of a block of which the pruned prefill wrote ``num_pruned`` positions."""
        return self.plan if self.is_full_model else self.plan + num_pruned.to_bytes(4, "little")


def prefill_block_hashes(
    prefix_ids: Sequence[int], key: PrefixKey, block_size: int, images: ImageKeys | None = None
) -> list[bytes]:
    """Names of the full blocks of a prefix that the pruned prefill writes whole (``x_1..x_{N-1}``):
    what the engine's scheduler publishes for them, so a prefill worker and a decode worker name
    the same K/V alike."""
    hashes: list[bytes] = []
    block_key = key.block(block_size)
    for i in range(len(prefix_ids) // block_size):
        a, b = i * block_size, (i + 1) * block_size
        digests = images.digests_between(a, b) if images is not None else b""
        hashes.append(block_hash(hashes[-1] if hashes else b"", prefix_ids[a:b], block_key, digests))
    return hashes


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._cached: dict[bytes, int] = {}  # block hash -> block
        self._hash_of: dict[int, bytes] = {}  # block -> its hash, for cached blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: free ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a published prefix (referenced or evictable)."""
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= self.num_free_blocks

    def allocate(self, num_tokens: int) -> list[int]:
        """Blocks for ``num_tokens`` fresh positions (reference count 1 each)."""
        return self.allocate_blocks(self.blocks_for(num_tokens))

    def allocate_blocks(self, n: int) -> list[int]:
        if n > self.num_free_blocks:
            raise OutOfBlocks(f"need {n} blocks, {self.num_free_blocks} free")
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:  # evict the least recently released cached block: nobody holds it
                block, _ = self._evictable.popitem(last=False)
                del self._cached[self._hash_of.pop(block)]
            self.ref_counts[block] = 1
            out.append(block)
        return out

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block. Released in reverse, so that a sequence's tail (the
        least shared part of a prefix) is evicted before its head."""
        for block in reversed(blocks):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    # ---- prefix cache ---------------------------------------------------------------------------
    def cache(self, block: int, h: bytes) -> None:
        """Publish a full, referenced block under hash ``h``. When another block already holds that
        content (two requests computed the same prefix at once) this one stays private."""
        if h not in self._cached and block not in self._hash_of:
            self._cached[h] = block
            self._hash_of[block] = h

    def cached_block(self, h: bytes) -> int | None:
        return self._cached.get(h)

    def num_evictable_among(self, blocks: list[int]) -> int:
        """How many of ``blocks`` (cache hits) are evictable now: taking them shrinks ``num_free_blocks``."""
        return sum(1 for b in blocks if self.ref_counts[b] == 0)

    def take(self, blocks: list[int]) -> None:
        """One more reference to each cached block (a prefix hit); an evictable one is no longer."""
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self._evictable[block]
            self.ref_counts[block] += 1

    def slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        """Flat cache slots of positions ``start..end-1`` of a sequence."""
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]


def num_blocks_for_budget(arch: ModelArch, dtype: torch.dtype, block_size: int, budget_bytes: int) -> int:
    per_block = arch.kv_bytes_per_token(torch.finfo(dtype).bits // 8) * block_size
    return max(0, budget_bytes // per_block)


class KVCache:
    def __init__(self, arch: ModelArch, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        shape = cache_shape(arch.num_layers, num_blocks, block_size, arch.num_kv_heads, arch.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (T, Hkv, D) written at flat slots ``slot_mapping`` (T,)."""
        write_slots(self.k, self.v, layer, slot_mapping, k, v)

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V at flat ``slots`` (T,) -> two (T, Hkv, D) tensors (used to check transfers)."""
        return read_slots(self.k, layer, slots), read_slots(self.v, layer, slots)
