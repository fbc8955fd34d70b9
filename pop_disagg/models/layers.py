"""Building blocks of the decoder: RMSNorm (Llama and Gemma flavours), RoPE, MLP.

Numerics follow the reference implementations exactly (where they upcast, when they cast back),
because the parity tests compare our logits with Transformers' at 1e-4.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .arch import RopeSpec


class RMSNorm(nn.Module):
    """RMSNorm. ``gemma=True``: scale by ``1 + w`` and cast after the multiply (Gemma-3's order)."""

    def __init__(self, dim: int, eps: float, gemma: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps
        self.gemma = gemma

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The weight-free part, in float32 (shared with the fused skipped-run projection)."""
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def effective_weight(self) -> torch.Tensor:
        """The per-channel scale actually applied, in float32."""
        w = self.weight.float()
        return 1.0 + w if self.gemma else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemma:
            return (self.normalize(x) * (1.0 + self.weight.float())).type_as(x)
        return self.weight * self.normalize(x).to(x.dtype)


def rope_inv_freq(spec: RopeSpec, head_dim: int) -> torch.Tensor:
    """Inverse frequencies for RoPE, including Llama-3.1's ``llama3`` and ``linear`` scaling."""
    inv_freq = 1.0 / (spec.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if spec.rope_type == "linear":
        return inv_freq / spec.factor
    if spec.rope_type == "llama3":
        # Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
        old_ctx = spec.original_max_position_embeddings
        low_wavelen = old_ctx / spec.low_freq_factor
        high_wavelen = old_ctx / spec.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / spec.factor, inv_freq)
        smooth = (old_ctx / wavelen - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor)
        smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for ``positions`` (T,) -> two (T, 1, head_dim) tensors in ``dtype``."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, heads, head_dim), rotate-half convention (as every supported family uses)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SiLU for Llama/Qwen/Mistral, tanh-GELU for Gemma."""

    def __init__(self, hidden: int, inter: int, activation: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        gate = F.gelu(gate, approximate="tanh") if self.activation == "gelu_tanh" else F.silu(gate)
        return self.down_proj(gate * self.up_proj(x))
