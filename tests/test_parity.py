"""Our model code against Transformers' own forward, for every supported family."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from pop_disagg.config import EngineConfig, PruneConfig
from pop_disagg.engine.engine import LLMEngine
from pop_disagg.engine.sampling import SamplingParams
from pop_disagg.models.arch import ModelArch, ModelConfigError
from pop_disagg.models.attention import PrefillAttention
from pop_disagg.models.loader import load_model


def _hf(path):
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # compare fixed-length greedy runs
    return model


@pytest.mark.parametrize("n", [1, 9, 37])
def test_prefill_logits_match_transformers(tiny_ckpt, arch, n):
    path = tiny_ckpt(arch)
    ref, ours = _hf(path), load_model(path)
    ids = torch.randint(3, ref.config.vocab_size, (n,), generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
        got = ours.compute_logits(ours(ids, torch.arange(n), PrefillAttention([0, n])))
    assert (expected - got).abs().max().item() < 1e-4


def test_batched_decode_matches_transformers_generate(tiny_ckpt, arch):
    """Greedy decoding of a batch of different-length prompts through the paged engine (no POP)."""
    path = tiny_ckpt(arch)
    ref = _hf(path)
    engine = LLMEngine(
        EngineConfig(model=path, prune=PruneConfig(no_prune=True), kv_cache_memory_mb=8, block_size=4),
        model=load_model(path),
        model_path=path,
    )
    g = torch.Generator().manual_seed(0)
    # Lengths straddle the tiny models' sliding windows (8 for Gemma-3, 16 for Mistral).
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (1, 6, 19, 33)]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)[
            0, len(prompt) :
        ]
        assert out.token_ids == expected.tolist()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_bfloat16_loads_and_runs(tiny_ckpt):
    model = load_model(tiny_ckpt("gemma3"), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    h = model(torch.tensor([5, 6, 7]), torch.arange(3), PrefillAttention([0, 3]))
    assert torch.isfinite(model.compute_logits(h)).all()


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(ModelConfigError, match="unsupported architecture.*GPT2LMHeadModel"):
        ModelArch.from_pretrained(tmp_path)


def test_malformed_checkpoint_names_what_is_wrong(tiny_ckpt, tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny_ckpt("llama")
    shutil.copy(f"{src}/config.json", tmp_path / "config.json")
    with pytest.raises(ModelConfigError, match="no \\*.safetensors"):
        load_model(tmp_path)
    tensors = load_file(f"{src}/model.safetensors")
    del tensors["model.layers.2.mlp.down_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelConfigError, match="model.layers.2.mlp.down_proj.weight"):
        load_model(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="hidden_size"):
        load_model(tmp_path)


def test_sharded_checkpoint_with_index(tiny_ckpt, tmp_path):
    """Many safetensors files plus model.safetensors.index.json load like one file."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny_ckpt("qwen2")
    shutil.copy(f"{src}/config.json", tmp_path / "config.json")
    tensors = load_file(f"{src}/model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, chunk in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in chunk}, str(tmp_path / fname))
        weight_map.update({n: fname for n in chunk})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, b = load_model(src), load_model(tmp_path)
    ids = torch.arange(3, 15)
    with torch.no_grad():
        ha = a.compute_logits(a(ids, torch.arange(12), PrefillAttention([0, 12])))
        hb = b.compute_logits(b(ids, torch.arange(12), PrefillAttention([0, 12])))
    assert torch.equal(ha, hb)
