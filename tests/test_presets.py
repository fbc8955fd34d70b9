"""Architecture presets: their geometry matches the published checkpoints, the default POP plan
skips the paper's layer counts, and a random-weight model builds from a preset and runs (and
matches Transformers' model holding the same tensors)."""

from __future__ import annotations

import pytest
import torch

from pop_disagg.models.attention import PrefillAttention
from pop_disagg.models.presets import (
    build_random_model,
    preset_arch,
    preset_config,
    preset_names,
    transformers_config,
    transformers_peer,
)
from pop_disagg.pop.plan import PrunePlan

# (layers, hidden, heads, kv heads, head_dim, intermediate, vocab, layers skipped by default)
GEOMETRY = {
    "llama-3.1-8b": (32, 4096, 32, 8, 128, 14336, 128256, 10),
    "qwen3-8b": (36, 4096, 32, 8, 128, 12288, 151936, 12),
    "gemma-3-12b": (48, 3840, 16, 8, 256, 15360, 262208, 16),
}

# Small enough to build in milliseconds while keeping each preset's quirks (RoPE scaling, qk-norm,
# sliding windows, tied embeddings).
SHRINK = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=300,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


@pytest.mark.parametrize("name", sorted(GEOMETRY))
def test_big_preset_geometry(name):
    layers, hidden, heads, kv_heads, head_dim, inter, vocab, skipped = GEOMETRY[name]
    arch = preset_arch(name)
    assert (
        arch.num_layers,
        arch.hidden_size,
        arch.num_heads,
        arch.num_kv_heads,
        arch.head_dim,
        arch.intermediate_size,
        arch.vocab_size,
    ) == (layers, hidden, heads, kv_heads, head_dim, inter, vocab)
    plan = PrunePlan.default(arch.num_layers)
    assert len(plan.skip_layers) == skipped
    assert plan.skip_layers[-1] == layers - 1  # the deepest layers


def test_rope_and_window_quirks():
    llama = preset_arch("llama-3.1-8b")
    assert llama.rope_full.rope_type == "llama3" and llama.rope_full.factor == 8.0
    assert llama.rope_full.theta == 500000.0 and not llama.tie_word_embeddings
    qwen = preset_arch("qwen3-8b")
    assert qwen.has_qk_norm and qwen.rope_full.theta == 1_000_000.0 and set(qwen.layer_types) == {"full"}
    gemma = preset_arch("gemma-3-12b")
    # 5 sliding : 1 global, every 6th layer global; local RoPE base 10k, global linear x8.
    assert gemma.layer_types.count("full") == 8 and gemma.layer_types[5] == "full" and gemma.layer_types[4] == "sliding"
    assert gemma.sliding_window == 1024 and gemma.window_for_layer(0) == 1024 and gemma.window_for_layer(5) is None
    assert (
        gemma.rope_sliding.theta == 10000.0 and gemma.rope_full.rope_type == "linear" and gemma.rope_full.factor == 8.0
    )
    assert gemma.attn_scale == 256**-0.5 and gemma.tie_word_embeddings


def test_cpu_preset_is_llama_shaped():
    arch = preset_arch("cpu")
    assert arch.family == "llama" and arch.num_layers == 24 and arch.hidden_size == 1024
    assert len(PrunePlan.default(arch.num_layers).skip_layers) == 8
    # Same GQA and MLP proportions as Llama-3.1-8B, so the ideal POP speedup is comparable.
    big = preset_arch("llama-3.1-8b")
    assert arch.num_heads // arch.num_kv_heads == big.num_heads // big.num_kv_heads
    assert arch.intermediate_size / arch.hidden_size == big.intermediate_size / big.hidden_size


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="llama-3.1-8b"):
        preset_config("llama-9b")


def test_random_model_is_materialised_in_dtype_and_seeded():
    arch = preset_arch("llama-3.1-8b", **SHRINK)
    a = build_random_model(arch, dtype=torch.bfloat16, seed=3)
    b = build_random_model(arch, dtype=torch.bfloat16, seed=3)
    params = dict(a.named_parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in params.values())
    assert torch.equal(
        params["model.layers.2.mlp.up_proj.weight"], dict(b.named_parameters())["model.layers.2.mlp.up_proj.weight"]
    )
    assert params["model.layers.0.input_layernorm.weight"].float().mean().item() == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("name", preset_names())
def test_shrunk_preset_runs_and_matches_transformers(name):
    overrides = dict(SHRINK)
    if name == "gemma-3-12b":
        overrides.update(sliding_window=8, query_pre_attn_scalar=16)  # 20 tokens cross the window
    raw = preset_config(name, **overrides)
    model = build_random_model(preset_arch(name, **overrides), seed=1)
    peer = transformers_peer(model, transformers_config(raw))
    ids = torch.randint(0, raw["vocab_size"], (20,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = model.compute_logits(model(ids, torch.arange(20), PrefillAttention([0, 20])))
        ref = peer(ids[None]).logits[0].float()
    assert ours.shape == (20, raw["vocab_size"])
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_cpu_preset_random_model_forward_with_pop_plan():
    arch = preset_arch("cpu")
    model = build_random_model(arch, seed=0)
    plan = PrunePlan.default(arch.num_layers)
    stored: dict[int, torch.Tensor] = {}
    attn = PrefillAttention([0, 6], sink=lambda layer, k, v: stored.__setitem__(layer, k))
    with torch.inference_mode():
        hidden = model(torch.arange(6), torch.arange(6), attn, plan=plan)
        logits = model.compute_logits(hidden[-1:])
    assert hidden.shape == (6, 1024) and torch.isfinite(logits).all()
    # Independent K/V: every layer, skipped or not, wrote keys for every prompt token.
    assert sorted(stored) == list(range(24)) and all(k.shape == (6, 4, 64) for k in stored.values())
