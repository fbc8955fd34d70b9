"""Static layer pruning in the style of ShortGPT, the baseline POP is compared with (paper Table 1).

ShortGPT (Men et al., 2024) removes whole layers from the model, for every token and both stages,
choosing those with the lowest Block Influence: ``BI_l = 1 - E_t[cos(h_l,t, h_{l+1},t)]``, the
mean cosine similarity between a layer's input and output hidden states over calibration tokens
(its eq. 2). Here a statically pruned model is the same ``CausalLM`` driven by a plan in both
stages (``Method(is_static=True)`` in ``scorer.py``): nothing is forked or rewritten.

To compare at equal cost, the number of layers removed is matched to POP's prefill FLOPs saving:
a POP-skipped layer still pays for its K/V projections, a statically removed layer pays nothing.
"""

from __future__ import annotations

import math

import torch

from ..models.arch import ModelArch
from ..models.attention import PrefillAttention
from ..models.decoder import CausalLM
from ..pop.plan import PrunePlan


@torch.inference_mode()
def block_influence(model: CausalLM, texts: list[list[int]]) -> list[float]:
    """BI per layer over all tokens of ``texts`` (full model, one prefill per text)."""
    num_layers = model.arch.num_layers
    sums = [0.0] * num_layers
    count = 0

    def hook(layer: int):
        def fn(module, args, output):
            h_in, h_out = args[0].double(), output.double()
            cos = (h_in * h_out).sum(-1) / (h_in.norm(dim=-1) * h_out.norm(dim=-1)).clamp_min(1e-30)
            sums[layer] += float(cos.sum())

        return fn

    handles = [model.model.layers[l].register_forward_hook(hook(l)) for l in range(num_layers)]
    try:
        for ids in texts:
            n = len(ids)
            model(
                torch.tensor(ids, device=model.device), torch.arange(n, device=model.device), PrefillAttention([0, n])
            )
            count += n
    finally:
        for h in handles:
            h.remove()
    return [1.0 - s / count for s in sums]


def kv_fraction(arch: ModelArch, prompt_len: int) -> float:
    """Share of one layer's prefill FLOPs spent on its K/V projections, at ``prompt_len`` tokens.

    Per token: projections 2*H*(q + 2kv) + 2*q*H (Q, K, V, O), gated MLP 3 * 2*H*I, and attention
    scores + weighted sum over on average ``prompt_len / 2`` keys: 2 * 2 * q * prompt_len / 2.
    """
    h, q, kv, i = arch.hidden_size, arch.q_size, arch.kv_size, arch.intermediate_size
    kv_flops = 2 * h * 2 * kv
    layer = 2 * h * q + kv_flops + 2 * q * h + 6 * h * i + 2 * q * prompt_len
    return kv_flops / layer


def prefill_flops_saving(arch: ModelArch, num_skipped: int, prompt_len: int, is_static: bool) -> float:
    """Fraction of the decoder stack's prefill FLOPs saved by skipping ``num_skipped`` layers."""
    kept_share = 0.0 if is_static else kv_fraction(arch, prompt_len)
    return num_skipped * (1.0 - kept_share) / arch.num_layers


def matched_static_count(arch: ModelArch, pop_plan: PrunePlan, prompt_len: int) -> int:
    """Layers a static pruner removes to save the same prefill FLOPs as ``pop_plan`` (rounded)."""
    saving = prefill_flops_saving(arch, len(pop_plan.skip_layers), prompt_len, is_static=False)
    return max(1, math.floor(saving * arch.num_layers + 0.5))


def static_plan_from_influence(influence: list[float], num_remove: int) -> PrunePlan:
    """Remove the ``num_remove`` layers with the lowest Block Influence."""
    order = sorted(range(len(influence)), key=lambda l: influence[l])
    return PrunePlan(num_layers=len(influence), skip_layers=tuple(order[:num_remove]))
