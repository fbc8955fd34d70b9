"""Virtual gates: one teacher-forced pass whose prompt and response positions see different gates.

Every layer ``l`` has a prefill gate ``g_pre[l]`` and a decode gate ``g_dec[l]``; the decoder
multiplies both branch outputs of layer ``l`` by the gate of each token's position (POP paper,
eq. 5). Under POP the prompt ``x_1..x_N`` splits at the boundary: ``x_1..x_{N-1}`` are prefill, the
last prompt token ``x_N`` is the first decode step (mechanism 3). So in the flattened sequence
``prompt + response`` positions ``0..N-2`` take ``g_pre`` and positions ``N-1..`` take ``g_dec``.

This is the same computation POP runs: a layer whose prefill gate is 0 leaves the residual stream of
the prompt positions unchanged, yet still writes K/V computed from the hidden state that reaches it
(independent K/V, mechanism 2), and the response positions attend to those K/V through the full
model. ``tests/test_calibration.py`` checks that agreement against the engine's real POP path.

The loss is the cross-entropy of the response tokens summed over the response (paper eq. 12).
Gradients are taken with ``torch.autograd.grad`` with respect to the gates only, so model parameters
never accumulate ``.grad``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.attention import PrefillAttention
from ..models.decoder import CausalLM
from ..models.multimodal import ImageBlockPrefillAttention, PromptImages, VisionRows


def stage_gates(
    g_prefill: torch.Tensor, g_decode: torch.Tensor, num_prompt_tokens: int, num_tokens: int
) -> torch.Tensor:
    """(L,) prefill and decode gates -> (L, T, 1) per-position gates for ``num_tokens`` positions.

    Positions ``0..num_prompt_tokens-2`` are prefill; the boundary token and everything after it
    are decode. Built with ``torch.where`` so gradients flow back to both (L,) leaves.
    """
    is_prefill = torch.arange(num_tokens, device=g_prefill.device) < num_prompt_tokens - 1  # (T,)
    return torch.where(is_prefill[None, :, None], g_prefill[:, None, None], g_decode[:, None, None])


def gated_hidden(
    model: CausalLM,
    token_ids: torch.Tensor,
    num_prompt_tokens: int,
    g_prefill: torch.Tensor,
    g_decode: torch.Tensor,
    images: PromptImages | None = None,
) -> torch.Tensor:
    """Teacher-forced pass over ``token_ids`` (T,) with stage gates; returns hidden (T, hidden).
    ``images``: the prompt's encoded images (a vision-language model): their rows, multimodal
    positions and image attention, as the engine's prefill has them."""
    t = token_ids.shape[0]
    # Gates stay float32 leaves; the cast to the model dtype sits inside the graph, so the sum of a
    # gate's gradient over positions happens in float32 even for a bf16 model.
    gates = stage_gates(g_prefill, g_decode, num_prompt_tokens, t).to(model.dtype)  # (L, T, 1)
    positions = torch.arange(t, device=token_ids.device)
    if images is None:
        return model(token_ids, positions, PrefillAttention([0, t]), gates=gates)
    if images.mrope is not None:
        positions = images.rope_positions(0, t).to(token_ids.device)
    is_bidirectional = model.arch.vision_family == "gemma3"
    attn = ImageBlockPrefillAttention([0, t], spans=[images.spans]) if is_bidirectional else PrefillAttention([0, t])
    return model(token_ids, positions, attn, gates=gates, vision=VisionRows.gather([(images, 0, t, 0)]))


def response_logits(
    model: CausalLM,
    prompt_ids: list[int],
    response_ids: list[int],
    g_prefill: torch.Tensor,
    g_decode: torch.Tensor,
    images: PromptImages | None = None,
) -> torch.Tensor:
    """Logits (R, vocab) float32 that predict each response token, from one gated pass.

    Response token ``i`` sits at position ``N + i`` and is predicted at position ``N + i - 1``; the
    last response token is never an input, so the pass covers ``N + R - 1`` tokens.
    """
    if not prompt_ids or not response_ids:
        raise ValueError("calibration needs a non-empty prompt and a non-empty response")
    n = len(prompt_ids)
    ids = torch.tensor(prompt_ids + response_ids[:-1], dtype=torch.long, device=model.device)
    hidden = gated_hidden(model, ids, n, g_prefill, g_decode, images)
    return model.compute_logits(hidden[n - 1 :])  # (R, vocab)


def unit_gates(model: CausalLM) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh (L,) float32 prefill and decode gates at 1, requiring grad."""
    num_layers = model.arch.num_layers
    return tuple(torch.ones(num_layers, dtype=torch.float32, device=model.device, requires_grad=True) for _ in range(2))


def response_loss(
    model: CausalLM,
    prompt_ids: list[int],
    response_ids: list[int],
    g_prefill: torch.Tensor,
    g_decode: torch.Tensor,
    images: PromptImages | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of the response tokens (paper eq. 12), a scalar float32."""
    logits = response_logits(model, prompt_ids, response_ids, g_prefill, g_decode, images)
    targets = torch.tensor(response_ids, dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, targets, reduction="sum")


def gate_gradients(
    model: CausalLM, prompt_ids: list[int], response_ids: list[int], images: PromptImages | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """dL/dg_pre and dL/dg_dec at g = 1 (each (L,) float32, on CPU) and the loss value."""
    g_prefill, g_decode = unit_gates(model)
    loss = response_loss(model, prompt_ids, response_ids, g_prefill, g_decode, images)
    # allow_unused: with a one-token prompt no position is prefill; the gradient is then exactly 0.
    grad_pre, grad_dec = torch.autograd.grad(loss, [g_prefill, g_decode], allow_unused=True)
    zeros = torch.zeros_like(g_prefill)
    grad_pre = zeros if grad_pre is None else grad_pre
    grad_dec = zeros if grad_dec is None else grad_dec
    return grad_pre.detach().cpu(), grad_dec.detach().cpu(), float(loss.detach())
