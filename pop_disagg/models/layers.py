"""Building blocks of the decoder: RMSNorm (Llama and Gemma flavours), RoPE, MLP.

Numerics follow the reference implementations exactly (where they upcast, when they cast back),
because the parity tests compare our logits with Transformers' at 1e-4.

``fuse_linears`` is how the decoder gets one GEMM for q/k/v and one for gate/up while keeping the
checkpoint's parameter names: the separate ``nn.Linear`` modules stay (so weights load, hook and
compare by their Hugging Face names), but their weights become views into one fused tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_blas
from .arch import RopeSpec


class RMSNorm(nn.Module):
    """RMSNorm. ``gemma=True``: scale by ``1 + w`` and cast after the multiply (Gemma-3's order)."""

    def __init__(self, dim: int, eps: float, gemma: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps
        self.gemma = gemma
        self._consts: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The weight-free part, in float32 (shared with the fused skipped-run projection)."""
        x = x.float()
        return x * self._inv_rms(x)

    def _inv_rms(self, x: torch.Tensor) -> torch.Tensor:
        """1 / sqrt(mean(x^2) + eps) of float32 ``x`` over its last dim, (..., 1)."""
        if torch.is_grad_enabled():  # calibration differentiates through the norm
            return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        # The same arithmetic in four calls on one temporary, bitwise equal to the line above
        # (tests/test_speed_paths.py): with ~60 norms in a decode step, per-op dispatch is what a
        # norm costs on a CPU (torch's own rms_norm makes ~12 calls here, two of them copies).
        # The divisor and eps as float32 0-dim tensors: a Python number becomes a fresh tensor and
        # a dtype conversion inside every in-place call (bitwise the same value either way).
        consts = self._consts.get(x.device)
        if consts is None:
            consts = self._consts[x.device] = (
                torch.tensor(float(x.shape[-1]), device=x.device),
                torch.tensor(self.eps, device=x.device),
            )
        return (x * x).sum(-1, keepdim=True).div_(consts[0]).add_(consts[1]).rsqrt_()

    def effective_weight(self) -> torch.Tensor:
        """The per-channel scale actually applied, in float32."""
        w = self.weight.float()
        return 1.0 + w if self.gemma else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and not torch.is_grad_enabled():
            # On a GPU each of the ~9 ops above is its own kernel, and ~65 norms of them were a
            # fifth of an 8B decode step's graph (benchmarks/results/gpu/README.md, "Decode step on an H200").
            # torch's fused rms_norm reduces in float32 whatever the input and rounds once to the
            # input's dtype, the value ``normalize(x).to(x.dtype)`` gives, in one kernel.
            if self.gemma:
                return F.rms_norm(x.float(), (x.shape[-1],), 1.0 + self.weight.float(), self.eps).type_as(x)
            return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        if self.gemma:  # scale in float32, then cast
            return (self.normalize(x) * (1.0 + self.weight.float())).type_as(x)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32 and not torch.is_grad_enabled():
            return (x * self._inv_rms(x)).mul_(self.weight)  # in place on the fresh product
        # Llama casts the normalised value back *before* the weight multiply.
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


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for ``positions`` (T,) -> (cos, signed sin), two (T, 1, head_dim) tensors in ``dtype``.

    The sine's first half is negated once here, so ``apply_rope`` needs no negation per call
    (``-x2 * s == x2 * -s`` exactly, so the result is bitwise the rotate-half formula).
    """
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    sin = freqs.sin()[:, None, :]
    return emb.cos().to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x: (T, heads, head_dim), rotate-half convention (as every supported family uses);
    ``cos``/``sin_signed`` from ``rope_cos_sin``."""
    x1, x2 = x.chunk(2, dim=-1)  # one call for both halves: per-op dispatch is a decode step's cost
    return x * cos + torch.cat((x2, x1), dim=-1) * sin_signed


class FusedLinear:
    """Several ``nn.Linear`` over the same input computed as one GEMM: ``x @ weight_t (+ bias)``.

    ``weight_t`` is stored (in, sum of outs), i.e. transposed against ``nn.Linear``: on the CPU
    this project benchmarks, MKL streams a one-row GEMM over that layout 1.3-2x faster than over
    (out, in) and batch-16 GEMMs are no slower (benchmarks/results/decode/README.md, "Decode speed"). The member
    modules' ``weight``/``bias`` are rebound to views of the fused tensors, so in-place edits
    through the old names (tests, K/V correction) change the fused GEMM too, and the fusion is
    valid for exactly as long as those parameters are the views it made (``is_current``).
    """

    def __init__(self, linears: list[nn.Linear]):
        w0 = linears[0].weight
        sizes = [lin.out_features for lin in linears]
        self.sizes = sizes
        self.weight_t = torch.empty(w0.shape[1], sum(sizes), dtype=w0.dtype, device=w0.device)  # (in, out_total)
        has_bias = linears[0].bias is not None
        self.bias = torch.empty(sum(sizes), dtype=w0.dtype, device=w0.device) if has_bias else None
        start = 0
        with torch.no_grad():
            for lin, n in zip(linears, sizes):
                self.weight_t[:, start : start + n].copy_(lin.weight.t())
                lin.weight = nn.Parameter(
                    self.weight_t[:, start : start + n].t(), requires_grad=False
                )  # (out, in) view
                if has_bias:
                    self.bias[start : start + n].copy_(lin.bias)
                    lin.bias = nn.Parameter(self.bias[start : start + n], requires_grad=False)
                start += n
        self._members = [(lin, lin.weight) for lin in linears]
        self.packed = cpu_blas.PackedWeight(self.weight_t)  # oneDNN's copy, made on first use

    def is_current(self) -> bool:
        # A member whose weight was replaced (``.to()``, ``load_state_dict(assign=True)``) or that
        # carries a forward hook (the hook expects its own call) must not be bypassed. A plain loop
        # over the modules' own dicts: this runs twice per layer per decode step.
        for lin, w in self._members:
            if lin._parameters["weight"] is not w or lin._forward_hooks or lin._forward_pre_hooks:
                return False
        return True

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, in) -> (T, sum of outs), the members' outputs side by side."""
        return cpu_blas.linear(x, self.weight_t, self.bias, self.packed)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        # x: (T, in) -> one (T, out_i) slice per member.
        return self.project(x).split_with_sizes(self.sizes, dim=-1)


def fuse_linears(linears: list[nn.Linear]) -> FusedLinear | None:
    """The fused GEMM of ``linears`` (same input, dtype and device), or None on the meta device."""
    if linears[0].weight.device.type == "meta":
        return None
    return FusedLinear(linears)


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SiLU for Llama/Qwen/Mistral, tanh-GELU for Gemma."""

    def __init__(self, hidden: int, inter: int, activation: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.activation = activation
        self.gate_up: FusedLinear | None = None  # set by ``fuse()`` once the weights are real
        self.down: FusedLinear | None = None  # down_proj alone in the (in, out) layout, also by ``fuse()``

    def fuse(self) -> None:
        self.gate_up = fuse_linears([self.gate_proj, self.up_proj])
        self.down = fuse_linears([self.down_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.gate_up is not None and self.gate_up.is_current()
        if fused:
            gate, up = self.gate_up(x)  # one GEMM for both
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if fused and self.activation != "gelu_tanh" and not torch.is_grad_enabled():
            # In place on the fused GEMM's output (no two fresh (T, inter) tensors per layer; the down
            # GEMM reads the strided half as it is). Calibration differentiates: out of place there.
            return self._down(F.silu(gate, inplace=True).mul_(up))
        gate = F.gelu(gate, approximate="tanh") if self.activation == "gelu_tanh" else F.silu(gate)
        return self._down(gate * up)

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        return self.down.project(x) if self.down is not None and self.down.is_current() else linear(self.down_proj, x)


def linear(mod: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``mod(x)`` through ``cpu_blas`` (the process's CPU GEMM), or the module's own call when it
    carries a hook (a hook expects its call to happen)."""
    if mod._forward_hooks or mod._forward_pre_hooks:
        return mod(x)
    return cpu_blas.linear(x, mod.weight.t(), mod.bias)
