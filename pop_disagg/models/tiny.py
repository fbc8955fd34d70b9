"""Tiny random checkpoints of every supported family, written with Transformers' own classes.

Used by tests (parity against Transformers) and by ``pop-disagg make-tiny-model``. The tokenizer is
a byte-level BPE trained offline on a few built-in sentences, so it round-trips any text.
"""

from __future__ import annotations

from pathlib import Path

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Prefill-only pruning skips the deepest layers while reading the prompt.",
    "Disaggregated serving runs prefill and decode on separate workers.",
    "Keys and values move from the prefill worker to the decode worker.",
    "Once upon a time there was a small language model that liked to count: 1 2 3 4 5 6 7 8 9 10.",
    "Hello, world! How are you today? I am fine, thank you.",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int, **overrides):
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        common["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        cfg = tf.LlamaConfig(**{**common, **overrides})
    elif arch == "mistral":
        cfg = tf.MistralConfig(**{**common, "sliding_window": 16, **overrides})
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**{**common, "tie_word_embeddings": True, **overrides})
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**{**common, "head_dim": 32, **overrides})
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(
            **{
                **common,
                "head_dim": 16,
                "sliding_window": 8,
                "query_pre_attn_scalar": 16,
                "tie_word_embeddings": True,
                "layer_types": None,
                "_sliding_window_pattern": 3,
                **overrides,
            }
        )
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return cfg


def make_tiny_model(out: str | Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a random ``arch`` checkpoint (safetensors + config + tokenizer) into ``out``."""
    import torch
    import transformers as tf

    out = Path(out)
    tokenizer = build_tokenizer()
    cfg = tiny_config(arch, len(tokenizer), **overrides)
    cls = tf.Gemma3ForCausalLM if arch == "gemma3" else tf.AutoModelForCausalLM
    torch.manual_seed(seed)
    model = cls.from_config(cfg) if cls is tf.AutoModelForCausalLM else cls(cfg)
    with torch.no_grad():
        # Random init leaves norms at 1 (0 for Gemma): perturb them so folding/norm bugs show up.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
