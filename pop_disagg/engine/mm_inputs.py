"""The image parts of a step's tensors: which rows take vision features, the multimodal positions,
and the prefill attention an image needs.

A request with images carries its ``PromptImages`` (``request.images``, made by the engine when
it is added: the vision encoder runs once per image, before the prompt's prefill). A step covers
positions ``start..start+n-1`` of each of its requests; these helpers turn that into what the
decoder takes: ``VisionRows`` for the image rows in the slice, (3, T) positions for a Qwen-VL
model (only when a request of the step has images: text-only positions are equal on all three
axes, which is ordinary RoPE) and, for Gemma-3, attention that lets an image see itself both ways.
Decode rows only need their offset: position ``p`` becomes ``p + delta`` (``PromptImages.mrope_delta``).
"""

from __future__ import annotations

import torch

from ..models.attention import PrefillAttention
from ..models.multimodal import ImageBlockPrefillAttention, VisionRows
from .request import Request


def has_images(reqs: list[Request]) -> bool:
    return any(r.images is not None for r in reqs)


def step_positions(reqs: list[Request], starts: list[int], counts: list[int], pos: torch.Tensor, is_mrope: bool):
    """The model's positions for the rows (``pos``: their (T,) cache positions)."""
    if not is_mrope or not has_images(reqs):
        return pos
    parts = [
        r.images.rope_positions(s, s + n) if r.images is not None else torch.arange(s, s + n).expand(3, -1)
        for r, s, n in zip(reqs, starts, counts)
    ]
    return torch.cat(parts, dim=1).to(pos.device)


def step_vision(reqs: list[Request], starts: list[int], counts: list[int], first_row: int = 0) -> VisionRows | None:
    """The image rows among the step's rows (requests' slices back to back from ``first_row``)."""
    if not has_images(reqs):
        return None
    slices, row = [], first_row
    for r, s, n in zip(reqs, starts, counts):
        slices.append((r.images, s, s + n, row))
        row += n
    return VisionRows.gather(slices)


def decode_positions(reqs: list[Request], pos: torch.Tensor) -> torch.Tensor:
    """One-token rows: position ``p`` of a request with images is ``p + delta`` on every axis."""
    deltas = [r.images.mrope_delta if r.images is not None else 0 for r in reqs]
    if not any(deltas):
        return pos
    return pos + torch.tensor(deltas, dtype=pos.dtype, device=pos.device)


def join_positions(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Decode rows' positions, then chunk rows': (3, T) when either side is."""
    if a.dim() == b.dim():
        return torch.cat([a, b], dim=-1)
    a, b = (a if a.dim() == 2 else a.expand(3, -1)), (b if b.dim() == 2 else b.expand(3, -1))
    return torch.cat([a, b], dim=1)


def prefill_attention(reqs: list[Request], counts: list[int], cu: list[int], sink, is_bidirectional: bool):
    """``PrefillAttention`` over fresh prompt prefixes; Gemma-3's image blocks where a prompt has images."""
    if not is_bidirectional or not has_images(reqs):
        return PrefillAttention(cu, sink=sink)
    spans = [
        [(s, e) for s, e in r.images.spans if e <= n] if r.images is not None else [] for r, n in zip(reqs, counts)
    ]
    return ImageBlockPrefillAttention(cu, sink=sink, spans=spans)
