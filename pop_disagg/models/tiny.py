"""Tiny random checkpoints of every supported family, written with Transformers' own classes.

Used by tests (parity against Transformers) and by ``pop-disagg make-tiny-model``. The tokenizer is
a byte-level BPE trained offline on a few built-in sentences, so it round-trips any text.

``make_tiny_vlm`` writes the vision-language families (``qwen3_vl``, ``qwen2_5_vl``, ``gemma3_vision``)
the same way: Transformers' ``Qwen3VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``
/ ``Gemma3ForConditionalGeneration`` with a tiny vision tower, the tokenizer with the family's image tokens added, and the checkpoint's image
processor (``preprocessor_config.json``) sized so an image is a handful of tokens.
"""

from __future__ import annotations

from pathlib import Path

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
VLM_ARCHS = ("qwen3_vl", "qwen2_5_vl", "gemma3_vision")
_IMAGE_TOKENS = {
    "qwen3_vl": ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"],
    "qwen2_5_vl": ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"],
    "gemma3_vision": ["<start_of_image>", "<image_soft_token>", "<end_of_image>"],
}

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
    _perturb(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _perturb(model) -> None:
    import torch

    with torch.no_grad():
        # Random init leaves norms at 1 (0 for Gemma): perturb them so folding/norm bugs show up.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            if name.endswith("mm_input_projection_weight"):
                # Gemma-3 initializes its image projection to zeros: every image's features would be
                # zero, and no test could tell one image from another.
                p.normal_(0, 0.1)


def make_tiny_vlm(out: str | Path, arch: str = "qwen3_vl", seed: int = 0) -> Path:
    """Write a random vision-language checkpoint (one of ``VLM_ARCHS``) into ``out``."""
    import torch
    import transformers as tf

    out = Path(out)
    tokenizer = build_tokenizer()
    if arch not in _IMAGE_TOKENS:
        raise ValueError(f"unknown tiny vision-language architecture {arch!r}; choose one of {', '.join(VLM_ARCHS)}")
    tokenizer.add_special_tokens({"additional_special_tokens": _IMAGE_TOKENS[arch]})
    ids = [tokenizer.convert_tokens_to_ids(t) for t in _IMAGE_TOKENS[arch]]
    vocab = len(tokenizer)
    if arch == "qwen3_vl":
        text = dict(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=512,
            pad_token_id=0,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [6, 5, 5],
                "mrope_interleaved": True,
            },
        )
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=64,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0, 1],
        )
        cfg = tf.Qwen3VLConfig(
            text_config=text,
            vision_config=vision,
            vision_start_token_id=ids[0],
            image_token_id=ids[1],
            vision_end_token_id=ids[2],
            video_token_id=ids[3],
            tie_word_embeddings=False,
        )
        cls = tf.Qwen3VLForConditionalGeneration
    elif arch == "qwen2_5_vl":
        # head_dim 32: the contiguous M-RoPE sections (temporal, height, width) cover its 16 frequencies.
        text = dict(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=6,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=512,
            pad_token_id=0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        )
        # Windows of 32 pixels (2 x 2 merged tokens) in the first block, full attention in the second.
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=64,
            window_size=32,
            fullatt_block_indexes=[1],
        )
        cfg = tf.Qwen2_5_VLConfig(
            text_config=text,
            vision_config=vision,
            vision_start_token_id=ids[0],
            image_token_id=ids[1],
            vision_end_token_id=ids[2],
            video_token_id=ids[3],
            tie_word_embeddings=False,
        )
        cls = tf.Qwen2_5_VLForConditionalGeneration
    else:
        text = tiny_config("gemma3", vocab).to_dict()
        vision = tf.SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=4,
        )
        # 8 x 8 patches pooled to 4 x 4 = 16 tokens per image: wider than the sliding window (8).
        cfg = tf.Gemma3Config(
            text_config=text,
            vision_config=vision.to_dict(),
            mm_tokens_per_image=16,
            boi_token_index=ids[0],
            image_token_index=ids[1],
            eoi_token_index=ids[2],
        )
        cls = tf.Gemma3ForConditionalGeneration
        processor = tf.Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    if arch in ("qwen3_vl", "qwen2_5_vl"):
        # 16-pixel units (patch 8, merged 2 x 2): between 2 x 2 and 6 x 6 tokens per image.
        processor = tf.Qwen2VLImageProcessorPil(
            patch_size=8, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 32 * 32, "longest_edge": 96 * 96}
        )
    torch.manual_seed(seed)
    model = cls(cfg)
    _perturb(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    return out
