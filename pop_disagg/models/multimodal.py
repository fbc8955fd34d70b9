"""What the decoder needs to run a prompt with images: the rows the vision encoder's features take,
Qwen-VL's multimodal rotary positions, and Gemma-3's attention within an image.

* ``PromptImages``: one prompt's images after the vision encoder, held by its request: the prompt
  positions of the image placeholder tokens, their features (and Qwen3-VL's DeepStack features),
  the (3, N) multimodal positions with the offset later tokens' positions take, each image's span.
* ``VisionRows``: the image rows of one flattened forward (several requests, each a slice of its
  positions), with ``merge`` (features replace the placeholder embeddings) and ``inject``
  (DeepStack: features added to the residual stream after the first layers, as Qwen3-VL does).
* ``mrope_positions`` / ``mrope_cos_sin``: Qwen-VL's M-RoPE. Text tokens have one position on all
  three axes; an image's tokens have (start, start + row, start + column) on (temporal, height,
  width), and the text after it continues from ``start + max(rows, columns)``. Qwen3-VL: frequency
  ``i`` of the head reads the height axis when ``i % 3 == 1`` (within the first ``3 * section[1]``),
  the width axis when ``i % 3 == 2`` (within ``3 * section[2]``), else the temporal one
  ("interleaved"); Qwen2.5-VL: the first ``section[0]`` frequencies read the temporal axis, the
  next ``section[1]`` the height, the rest the width. With all three axes equal this is ordinary
  RoPE, so decode steps pass one position, ``p + delta``.
* ``ImageKeys``: a prompt's images as the prefix cache names them (each image's span and content
  digest, ``kv_cache.block_hash``).
* ``ImageBlockPrefillAttention``: Gemma-3 lets an image's tokens see each other both ways (causal
  OR same image; a sliding layer also keeps its window), as Transformers' Gemma-3 masks do.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .attention import PrefillAttention


@dataclass
class PromptImages:
    """One prompt's images after the vision encoder (see the module docstring)."""

    positions: list[int]  # prompt positions of the image placeholder tokens, ascending
    embeds: torch.Tensor  # (n, hidden) one row per placeholder token, in ``positions`` order
    deepstack: list[torch.Tensor] = field(default_factory=list)  # per early layer, (n, hidden)
    spans: list[tuple[int, int]] = field(default_factory=list)  # each image's [start, end) positions
    mrope: torch.Tensor | None = None  # (3, N) multimodal positions of the prompt (Qwen-VL)
    mrope_delta: int = 0  # position p >= N has multimodal position p + delta on every axis
    is_remote: bool = False  # only the offset: the images were encoded where the prompt was prefilled

    @classmethod
    def remote(cls, mrope_delta: int, hidden_size: int) -> "PromptImages":
        """What a disaggregated decode worker holds of a prompt's images: their position offset."""
        return cls([], torch.zeros(0, hidden_size), mrope_delta=mrope_delta, is_remote=True)

    def rows_between(self, start: int, end: int) -> tuple[list[int], slice]:
        """Placeholder positions in ``start..end-1`` and the slice of ``embeds`` they take."""
        i0, i1 = bisect.bisect_left(self.positions, start), bisect.bisect_left(self.positions, end)
        return self.positions[i0:i1], slice(i0, i1)

    def rope_positions(self, start: int, end: int) -> torch.Tensor:
        """(3, end - start) multimodal positions of positions ``start..end-1`` (prompt or generated)."""
        n = self.mrope.shape[1]
        head = self.mrope[:, start:end] if start < n else self.mrope[:, :0]
        tail = torch.arange(max(start, n), max(end, n)) + self.mrope_delta
        return torch.cat([head, tail.expand(3, -1)], dim=1)


@dataclass(frozen=True)
class ImageKeys:
    """A prompt's images as the prefix cache sees them: each image's [start, end) placeholder
    positions, a digest of its content (``vision.ProcessedImage.digest``: pixels and patch grid), and
    whether an image's tokens attend to each other both ways (Gemma-3)."""

    spans: tuple[tuple[int, int], ...]
    digests: tuple[bytes, ...]
    is_bidirectional: bool = False

    def digests_between(self, start: int, end: int) -> bytes:
        """The digests of the images with placeholder tokens among positions ``start..end-1``."""
        return b"".join(d for (s, e), d in zip(self.spans, self.digests) if s < end and e > start)

    def resumable(self, num_cached: int) -> int:
        """Of ``num_cached`` cached prompt positions, how many a prefill may start after. An image
        whose tokens see each other both ways is prefilled in one pass from the prompt's start
        (a pass that starts later attends causally), so such a prompt reuses a prefix only when
        it covers every image; otherwise all of it."""
        if self.is_bidirectional and any(e > num_cached for _, e in self.spans):
            return 0
        return num_cached


@dataclass
class VisionRows:
    """Image rows of one flattened forward: ``rows`` (n,) of the T tokens take ``embeds`` (n, hidden)."""

    rows: torch.Tensor
    embeds: torch.Tensor
    deepstack: list[torch.Tensor]

    @classmethod
    def gather(cls, slices: list[tuple[PromptImages | None, int, int, int]]) -> "VisionRows | None":
        """``slices``: (images, start, end, first row) per request of the forward: its positions
        ``start..end-1`` sit at rows ``first row..``. None when no slice holds an image token."""
        rows, embeds, deep = [], [], []
        for images, start, end, row0 in slices:
            if images is None:
                continue
            positions, take = images.rows_between(start, end)
            if not positions:
                continue
            rows += [row0 + p - start for p in positions]
            embeds.append(images.embeds[take])
            deep.append([d[take] for d in images.deepstack])
        if not rows:
            return None
        deepstack = [torch.cat(layer) for layer in zip(*deep)] if deep and deep[0] else []
        device = embeds[0].device
        return cls(torch.tensor(rows, dtype=torch.long, device=device), torch.cat(embeds), deepstack)

    def merge(self, h: torch.Tensor) -> torch.Tensor:
        """(T, hidden) embeddings -> the same with the image rows replaced by the features."""
        return h.index_copy(0, self.rows, self.embeds.to(h.dtype))

    def inject(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """After layer ``layer``: add its DeepStack features to the image rows (Qwen3-VL's first layers)."""
        if layer >= len(self.deepstack):
            return h
        return h.index_add(0, self.rows, self.deepstack[layer].to(h.dtype))


def mrope_positions(
    token_ids: list[int], image_token_id: int, grids: list[tuple[int, int, int]], merge_size: int
) -> tuple[torch.Tensor, int, list[tuple[int, int]]]:
    """Qwen-VL's (3, N) positions (Qwen3-VL and Qwen2.5-VL alike) for a prompt whose images have
    patch grids ``grids`` (t, h, w) -> (positions, delta for later tokens, each image's span)."""
    out, spans = [], []
    pos, i, n = 0, 0, len(token_ids)
    grid_iter = iter(grids)
    while i < n:
        if token_ids[i] != image_token_id:
            j = i
            while j < n and token_ids[j] != image_token_id:
                j += 1
            out.append((torch.arange(j - i) + pos).expand(3, -1))
            pos += j - i
            i = j
            continue
        t, h, w = next(grid_iter)
        gh, gw = h // merge_size, w // merge_size
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        block = torch.stack([tt + pos, hh + pos, ww + pos]).reshape(3, -1)  # (3, t * gh * gw)
        out.append(block)
        spans.append((i, i + block.shape[1]))
        i += block.shape[1]
        pos += max(gh, gw)
    positions = torch.cat(out, dim=1) if out else torch.zeros(3, 0, dtype=torch.long)
    delta = int(positions.max()) + 1 - n if n else 0
    return positions, delta, spans


def mrope_cos_sin(
    inv_freq: torch.Tensor,
    positions: torch.Tensor,
    section: tuple[int, int, int],
    dtype: torch.dtype,
    is_interleaved: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, T) positions -> (cos, signed sin), two (T, 1, head_dim) tensors, as ``layers.rope_cos_sin``."""
    half = inv_freq.shape[0]
    idx = torch.arange(half)
    axis = torch.zeros(half, dtype=torch.long)
    if is_interleaved:
        axis[(idx % 3 == 1) & (idx < 3 * section[1])] = 1
        axis[(idx % 3 == 2) & (idx < 3 * section[2])] = 2
    else:
        axis[(idx >= section[0]) & (idx < section[0] + section[1])] = 1
        axis[idx >= section[0] + section[1]] = 2
    freqs = positions.float()[axis.to(positions.device)].t() * inv_freq[None, :]  # (T, half)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    sin = freqs.sin()[:, None, :]
    return emb.cos().to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


@dataclass
class ImageBlockPrefillAttention(PrefillAttention):
    """``PrefillAttention`` where each image's tokens also see the image's later tokens (Gemma-3).

    ``spans[i]``: the [start, end) image spans of sequence ``i``, relative to its first token."""

    spans: list[list[tuple[int, int]]] = None

    def attend(self, layer, q, k, v, window: int | None, scale: float) -> torch.Tensor:
        outs = []
        for i, (a, b) in enumerate(zip(self.cu_seqlens[:-1], self.cu_seqlens[1:])):
            if not self.spans[i]:
                outs.append(self._attend_one(q[None, a:b], k[None, a:b], v[None, a:b], window, scale)[0])
                continue
            mask = image_block_mask(b - a, self.spans[i], window, q.device)
            qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))  # (1, H, n, D)
            if ks.shape[1] != qs.shape[1]:
                rep = qs.shape[1] // ks.shape[1]
                ks, vs = ks.repeat_interleave(rep, dim=1), vs.repeat_interleave(rep, dim=1)
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)[0].transpose(0, 1))
        return torch.cat(outs, dim=0)


def image_block_mask(n: int, spans: list[tuple[int, int]], window: int | None, device=None) -> torch.Tensor:
    """(n, n) visibility: key j from query i iff j <= i or both lie in one image; a sliding layer
    also needs i - w < j (Transformers: AND(window, OR(causal, block)))."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    block = torch.full((n,), -1, dtype=torch.long, device=device)
    for b, (s, e) in enumerate(spans):
        block[s:e] = b
    visible = (j <= i) | ((block[:, None] >= 0) & (block[:, None] == block[None, :]))
    return visible & (j > i - window) if window is not None else visible
