"""Architecture presets: the real geometries of the models the POP paper measures, plus small ones
for CPU benchmarks, and a random-weight ``CausalLM`` built from any of them without a checkpoint.

A preset is the ``config.json`` dict its Hugging Face checkpoint ships (same field names, same
legacy ``rope_theta`` + ``rope_scaling`` layout), so ``ModelArch.from_hf_dict`` parses it like a
real folder and Transformers can build the peer model from the very same dict. Only the fields that
change the compute are kept: geometry, RoPE (Llama-3.1's ``llama3`` scaling, Gemma-3's linear
scaling and local base), Gemma-3's sliding-window pattern, tied embeddings.

``build_random_model`` materialises the model from the ``meta`` device one parameter at a time,
directly on the target device and dtype, so an 8B preset in bf16 costs 16 GB on the GPU and never
a float32 copy or a file on disk.
"""

from __future__ import annotations

import copy

import torch

from ..pop.plan import PrunePlan
from .arch import ModelArch
from .decoder import CausalLM

PRESETS: dict[str, dict] = {
    # meta-llama/Llama-3.1-8B-Instruct
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
    },
    # Qwen/Qwen3-8B (the text tower of the paper's Qwen3-VL-8B has the same geometry)
    "qwen3-8b": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "use_sliding_window": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    # google/gemma-3-12b-it, text config: 5 sliding (window 1024, local base 10k) : 1 global layers
    "gemma-3-12b": {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": 262208,
        "hidden_size": 3840,
        "intermediate_size": 15360,
        "num_hidden_layers": 48,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 256,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 131072,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "sliding_window": 1024,
        "sliding_window_pattern": 6,
        "query_pre_attn_scalar": 256,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": [1, 106],
        "pad_token_id": 0,
    },
    # HuggingFaceTB/SmolLM2-135M-Instruct (stands in when no checkpoint folder is at hand)
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rope_scaling": None,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    # A Llama-3-shaped model small enough to benchmark on a laptop CPU: 24 layers (8 skipped by
    # default), hidden 1024, 4:1 GQA and a 3.5x MLP like Llama-3, so the K/V share of a layer
    # (about 4% of its linear FLOPs) and hence the ideal POP speedup match the 8B model's.
    "cpu": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 1024,
        "intermediate_size": 3584,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
}


def preset_names() -> tuple[str, ...]:
    return tuple(PRESETS)


def preset_config(name: str, **overrides) -> dict:
    """The preset's HF ``config.json`` dict (a fresh copy); ``overrides`` replace fields, e.g. to
    shrink a preset for a test while keeping its quirks."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    raw = copy.deepcopy(PRESETS[name])
    raw.update(overrides)
    return raw


def preset_arch(name: str, **overrides) -> ModelArch:
    return ModelArch.from_hf_dict(preset_config(name, **overrides), source=f"preset {name}")


@torch.no_grad()
def build_random_model(
    arch: ModelArch,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    prefill_only_plan: PrunePlan | None = None,
    std: float = 0.02,
) -> CausalLM:
    """A random-weight model for ``arch``, materialised parameter by parameter on ``device``.

    Matrices are N(0, std) (the usual LM init); norm weights are near their identity value
    (1 for Llama-style, 0 for Gemma's ``1 + w``) with a small perturbation, so hidden states stay
    well scaled through deep stacks and norm-folding bugs would still show.
    """
    device = torch.device(device)
    with torch.device("meta"):
        model = CausalLM(arch, prefill_only_plan)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for name, meta_param in list(model.named_parameters()):
        tensor = torch.empty(meta_param.shape, dtype=dtype, device=device)
        if "norm" in name:
            tensor.normal_(0.0, 0.02, generator=gen)
            if not arch.is_gemma:
                tensor.add_(1.0)
        else:  # matrices, embeddings and (Qwen2) biases
            tensor.normal_(0.0, std, generator=gen)
        module_name, _, param_name = name.rpartition(".")
        setattr(model.get_submodule(module_name), param_name, torch.nn.Parameter(tensor, requires_grad=False))
    model.eval().requires_grad_(False)
    model.fuse_weights()
    model.init_rope()
    return model


def transformers_config(raw: dict):
    """A Transformers config object from a ``config.json`` dict (a preset or a checkpoint's)."""
    from transformers import AutoConfig

    raw = dict(raw)
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def transformers_peer(model: CausalLM, hf_config, contiguous: bool = False):
    """Transformers' own model for ``hf_config``, holding ``model``'s weight tensors (no copy).

    Our parameter names are Transformers' names, so the state dict loads with ``assign=True``; the
    peer and our model then compute from the very same memory. Used as the reference in benchmarks
    and parity tests. ``contiguous``: give the peer its own contiguous copy of every weight that
    is a view into our fused q/k/v or gate/up tensors, so a speed comparison times Transformers
    in the (out, in) layout it normally runs (the values are identical).
    """
    import transformers as tf

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # Transformers 4.x
        from transformers.modeling_utils import no_init_weights

    if model.is_prefill_only:
        raise ValueError("a prefill-only model lacks the weights of a full Transformers model")
    # Gemma-3's text-only config maps to the multimodal class in the auto table; take the text one.
    cls = tf.Gemma3ForCausalLM if model.arch.is_gemma else tf.AutoModelForCausalLM._model_mapping[type(hf_config)]
    dtype_kw = "dtype" if int(tf.__version__.split(".")[0]) >= 5 else "torch_dtype"
    with torch.device(model.device), no_init_weights():
        peer = cls._from_config(hf_config, **{dtype_kw: model.dtype})
    state = model.state_dict()
    if contiguous:
        state = {k: v.contiguous() for k, v in state.items()}
    result = peer.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"Transformers' model has no tensors named {result.unexpected_keys[:5]}")
    untied = [k for k in result.missing_keys if not (k == "lm_head.weight" and model.arch.tie_word_embeddings)]
    if untied:
        raise ValueError(f"our model lacks tensors Transformers needs: {untied[:5]}")
    peer.tie_weights()
    return peer.eval().requires_grad_(False)
