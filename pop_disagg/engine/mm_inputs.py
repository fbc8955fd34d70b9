"""The image parts of a step's tensors: which rows take vision features, the multimodal positions,
and the prefill attention an image needs.

A request with images carries its ``PromptImages`` (``request.images``, made by the engine when
it is added: the vision encoder runs once per image, before the prompt's prefill). A step covers
positions ``start..start+n-1`` of each of its sequences; these functions take the sequences'
``PromptImages`` (None for a text prompt) and turn that into what the decoder takes: ``VisionRows``
for the image rows in the slice, (3, T) positions for a Qwen-VL model (only when a sequence of
the step has images: text-only positions are equal on all three axes, which is ordinary RoPE) and,
for Gemma-3, attention that lets an image see itself both ways. Decode rows only need their
offset: position ``p`` becomes ``p + delta`` (``PromptImages.mrope_delta``). The disaggregated
prefill worker uses the same functions for its tasks.
"""

from __future__ import annotations

import torch

from ..models.attention import PrefillAttention
from ..models.multimodal import ImageBlockPrefillAttention, PromptImages, VisionRows

Images = list[PromptImages | None]


def has_images(images: Images) -> bool:
    return any(im is not None for im in images)


def step_positions(images: Images, starts: list[int], counts: list[int], pos: torch.Tensor, is_mrope: bool):
    """The model's positions for the rows (``pos``: their (T,) cache positions)."""
    if not is_mrope or not has_images(images):
        return pos
    parts = [
        im.rope_positions(s, s + n) if im is not None else torch.arange(s, s + n).expand(3, -1)
        for im, s, n in zip(images, starts, counts)
    ]
    return torch.cat(parts, dim=1).to(pos.device)


def step_vision(images: Images, starts: list[int], counts: list[int], first_row: int = 0) -> VisionRows | None:
    """The image rows among the step's rows (the sequences' slices back to back from ``first_row``)."""
    if not has_images(images):
        return None
    slices, row = [], first_row
    for im, s, n in zip(images, starts, counts):
        slices.append((im, s, s + n, row))
        row += n
    return VisionRows.gather(slices)


def decode_positions(images: Images, pos: torch.Tensor) -> torch.Tensor:
    """One-token rows: position ``p`` of a prompt with images is ``p + delta`` on every axis."""
    deltas = [im.mrope_delta if im is not None else 0 for im in images]
    if not any(deltas):
        return pos
    return pos + torch.tensor(deltas, dtype=pos.dtype, device=pos.device)


def join_positions(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Decode rows' positions, then chunk rows': (3, T) when either side is."""
    if a.dim() == b.dim():
        return torch.cat([a, b], dim=-1)
    a, b = (a if a.dim() == 2 else a.expand(3, -1)), (b if b.dim() == 2 else b.expand(3, -1))
    return torch.cat([a, b], dim=1)


def prefill_attention(images: Images, counts: list[int], cu: list[int], sink, is_bidirectional: bool, **kw):
    """``PrefillAttention`` over fresh prompt prefixes; Gemma-3's image blocks where a prompt has images."""
    if not is_bidirectional or not has_images(images):
        return PrefillAttention(cu, sink=sink, **kw)
    spans = [[(s, e) for s, e in im.spans if e <= n] if im is not None else [] for im, n in zip(images, counts)]
    return ImageBlockPrefillAttention(cu, sink=sink, spans=spans, **kw)
