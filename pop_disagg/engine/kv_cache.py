"""Paged KV cache: block bookkeeping (plain Python) and the tensors it indexes.

``BlockManager`` hands out fixed-size blocks and never touches tensors, so the scheduler can use it
on any host. ``KVCache`` owns the two tensors, ``(num_layers, num_blocks, block_size, Hkv, D)``,
allocated once from a memory budget.
"""

from __future__ import annotations

import torch

from ..models.arch import ModelArch
from ..models.attention import write_slots


class OutOfBlocks(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def allocate(self, num_tokens: int) -> list[int]:
        n = self.blocks_for(num_tokens)
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        """Flat cache slots of positions ``start..end-1`` of a sequence."""
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]


def num_blocks_for_budget(arch: ModelArch, dtype: torch.dtype, block_size: int, budget_bytes: int) -> int:
    per_block = arch.kv_bytes_per_token(torch.finfo(dtype).bits // 8) * block_size
    return max(0, budget_bytes // per_block)


class KVCache:
    def __init__(self, arch: ModelArch, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        shape = (arch.num_layers, num_blocks, block_size, arch.num_kv_heads, arch.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (T, Hkv, D) written at flat slots ``slot_mapping`` (T,)."""
        write_slots(self.k, self.v, layer, slot_mapping, k, v)

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V at flat ``slots`` (T,) -> two (T, Hkv, D) tensors (used to check transfers)."""
        flat = (-1,) + tuple(self.k.shape[3:])
        return self.k[layer].view(flat).index_select(0, slots), self.v[layer].view(flat).index_select(0, slots)
