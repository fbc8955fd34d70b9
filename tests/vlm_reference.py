"""An independent POP reference for vision-language models, built only from Transformers' modules
(used by tests), as ``pop_reference.py`` is for text models.

The prompt's embeddings come from the Transformers model's own vision path (``get_image_features``
scattered into the placeholder rows), its positions from the model's own ``get_rope_index``
(Qwen3-VL) and its masks from Transformers' Gemma-3 mask builder (an image's tokens see each other
both ways). Then the language model runs layer by layer over x_1..x_{N-1}: kept layers through the
layer's own forward, skipped layers as identities whose K/V come from the layer's own input norm,
projections, k-norm and rotary embedding applied to the pruned hidden state; Qwen3-VL's DeepStack
features are added after the first layers whether those layers ran or were skipped.
"""

from __future__ import annotations

import torch

QWEN_TYPES = ("qwen3_vl", "qwen2_5_vl")


def hf_inputs(model, prompt_ids: list[int], images) -> dict:
    """The keyword arguments Transformers' forward takes for ``prompt_ids`` with ``images``
    (``ProcessedImage``s, as the checkpoint's image processor made them)."""
    ids = torch.tensor([prompt_ids])
    token_types = (ids == model.config.image_token_id).long()
    if model.config.model_type in QWEN_TYPES:
        return dict(
            input_ids=ids,
            pixel_values=torch.cat([im.pixel_values for im in images]),
            image_grid_thw=torch.tensor([im.grid_thw for im in images]),
            mm_token_type_ids=token_types,
        )
    return dict(input_ids=ids, pixel_values=torch.stack([im.pixel_values for im in images]), token_type_ids=token_types)


def _rotary(model, h, pos, layer_idx):
    lm = model.model.language_model
    if model.config.model_type in QWEN_TYPES:
        return lm.rotary_emb(h, pos)
    return lm.rotary_emb(h, pos, lm.config.layer_types[layer_idx])


def _prompt_state(model, inputs: dict, n: int):
    """-> embeddings (1, n, hidden) of the first ``n`` tokens, DeepStack features, image mask,
    rotary positions, per-layer-type masks and the position offset after the prompt."""
    inner = model.model
    ids = inputs["input_ids"]
    is_qwen = model.config.model_type in QWEN_TYPES
    embeds = inner.get_input_embeddings()(ids)
    image_mask = ids == model.config.image_token_id
    if is_qwen:
        out = inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
        feats = torch.cat(out.pooler_output)
        deepstack = [torch.cat(f) for f in getattr(out, "deepstack_features", None) or []]  # none in Qwen2.5-VL
        pos, delta = inner.get_rope_index(
            ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
        )
        delta = int(delta[0, 0])
    else:
        feats = inner.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output
        feats = feats.reshape(-1, feats.shape[-1])
        deepstack, delta = [], 0
        pos = torch.arange(ids.shape[1])[None]
    h = embeds.masked_scatter(image_mask[..., None], feats.to(embeds.dtype))[:, :n]
    image_mask, pos = image_mask[:, :n], pos[..., :n]
    if is_qwen:
        i = torch.arange(n)
        mask = torch.zeros(n, n).masked_fill(i[None, :] > i[:, None], torch.finfo(h.dtype).min)[None, None]
        masks = {"full_attention": mask}
    else:
        from transformers.models.gemma3.modeling_gemma3 import (
            create_masks_for_vision_model,
            get_block_sequence_ids_for_mask,
        )

        masks = create_masks_for_vision_model(
            config=model.config.get_text_config(),
            inputs_embeds=h,
            attention_mask=None,
            cache=None,
            position_ids=pos,
            block_sequence_ids=get_block_sequence_ids_for_mask(inputs["token_type_ids"][:, :n]),
        )
    return h, deepstack, image_mask, pos, masks, delta


@torch.no_grad()
def hf_vlm_pop_prefill(model, inputs: dict, skip: set[int]):
    """-> per-layer (k, v), each (1, Hkv, N-1, D), K after k-norm and RoPE, as Transformers computes."""
    if model.config.model_type == "qwen3_vl":
        from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb
    elif model.config.model_type == "qwen2_5_vl":  # its rotary module lays out the M-RoPE sections
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb
    else:
        from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

    n = inputs["input_ids"].shape[1] - 1
    h, deepstack, image_mask, pos, masks, _ = _prompt_state(model, inputs, n)
    lm = model.model.language_model
    types = getattr(lm.config, "layer_types", None) or ["full_attention"] * len(lm.layers)
    kv = []
    for l, layer in enumerate(lm.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        hd = attn.head_dim
        k = attn.k_proj(x).view(1, n, -1, hd)
        k = (attn.k_norm(k) if hasattr(attn, "k_norm") else k).transpose(1, 2)  # Qwen2.5-VL has no k-norm
        v = attn.v_proj(x).view(1, n, -1, hd).transpose(1, 2)
        cos, sin = _rotary(model, h, pos, l)
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        kv.append((k, v))
        if l not in skip:
            h = layer(h, attention_mask=masks[types[l]], position_embeddings=(cos, sin))
            h = h[0] if isinstance(h, tuple) else h
        if l < len(deepstack):
            h = lm._deepstack_process(h, image_mask, deepstack[l][: int(image_mask.sum())])
    return kv


@torch.no_grad()
def hf_vlm_pop_generate(model, inputs: dict, skip: set[int], max_new_tokens: int) -> list[int]:
    """POP greedy generation: reference prefill K/V in a DynamicCache, then the full HF model one
    token at a time (Qwen3-VL's positions after the prompt: ``p + delta`` on all three axes)."""
    from transformers import DynamicCache

    ids = inputs["input_ids"]
    n = ids.shape[1] - 1
    delta = _prompt_state(model, inputs, n)[5]
    cache = DynamicCache()
    for l, (k, v) in enumerate(hf_vlm_pop_prefill(model, inputs, skip)):
        cache.update(k, v, l)
    is_qwen = model.config.model_type in QWEN_TYPES
    out, token = [], int(ids[0, -1])
    for _ in range(max_new_tokens):
        pos = torch.tensor([[n + delta]])
        logits = model(
            input_ids=torch.tensor([[token]]),
            cache=cache,
            position_ids=pos.expand(3, 1, 1) if is_qwen else pos,
            use_cache=True,
        ).logits
        token = int(logits[0, -1].argmax())
        out.append(token)
        n += 1
    return out


def noise_image(height: int, width: int, seed: int = 0):
    """A deterministic random RGB PIL image (what the tests send)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
