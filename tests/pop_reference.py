"""An independent POP reference built only from Transformers' own modules (used by tests).

It runs a Transformers model layer by layer over prompt tokens x_1..x_{N-1}: kept layers through
the layer's own forward, skipped layers as identities whose K/V come from the layer's own input
norm, projections, k-norm and rotary embedding applied to the pruned hidden state.
"""

from __future__ import annotations

import torch


def _rope(model, h, pos, layer_idx):
    inner = model.model
    if hasattr(inner.config, "layer_types") and model.config.model_type == "gemma3_text":
        return inner.rotary_emb(h, pos, model.config.layer_types[layer_idx])
    return inner.rotary_emb(h, pos)


def _mask(model, n, layer_idx, dtype):
    i = torch.arange(n)
    visible = i[None, :] <= i[:, None]
    types = getattr(model.config, "layer_types", None)
    window = getattr(model.config, "sliding_window", None)
    is_sliding = types[layer_idx] == "sliding_attention" if types is not None else True  # Mistral: all
    if is_sliding and window:
        visible &= i[None, :] > i[:, None] - window
    m = torch.zeros(n, n, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    return m[None, None]


@torch.no_grad()
def hf_pop_prefill(model, prompt_ids: list[int], skip: set[int]):
    """-> per-layer (k, v), each (1, Hkv, N-1, D), K after k-norm and RoPE, as Transformers computes."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    ids = torch.tensor([prompt_ids[:-1]])
    n = ids.shape[1]
    pos = torch.arange(n)[None]
    h = model.model.embed_tokens(ids)
    kv = []
    for l, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        hd = attn.head_dim
        k = attn.k_proj(x).view(1, n, -1, hd)
        v = attn.v_proj(x).view(1, n, -1, hd).transpose(1, 2)
        if getattr(attn, "k_norm", None) is not None:
            k = attn.k_norm(k)
        k = k.transpose(1, 2)
        cos, sin = _rope(model, h, pos, l)
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        kv.append((k, v))
        if l not in skip:
            h = layer(h, attention_mask=_mask(model, n, l, h.dtype), position_ids=pos, position_embeddings=(cos, sin))
            h = h[0] if isinstance(h, tuple) else h
    return kv


@torch.no_grad()
def hf_pop_generate(model, prompt_ids: list[int], skip: set[int], max_new_tokens: int) -> list[int]:
    """POP greedy generation: reference prefill K/V in a DynamicCache, then the full HF model."""
    from transformers import DynamicCache

    cache = DynamicCache()
    if len(prompt_ids) > 1:
        for l, (k, v) in enumerate(hf_pop_prefill(model, prompt_ids, skip)):
            cache.update(k, v, l)
    out, token, n = [], prompt_ids[-1], len(prompt_ids) - 1
    for _ in range(max_new_tokens):
        logits = model(
            torch.tensor([[token]]), past_key_values=cache, position_ids=torch.tensor([[n]]), use_cache=True
        ).logits
        token = int(logits[0, -1].argmax())
        out.append(token)
        n += 1
    return out
