"""Model architecture description: one frozen record parsed from a checkpoint's ``config.json``.

Owns the translation from the Hugging Face config zoo (Llama, Mistral, Qwen2, Qwen3, Gemma-3 text,
and the language models of the Qwen3-VL and Gemma-3 vision-language checkpoints, whose text
settings sit under ``text_config``) into the handful of switches our single decoder implementation
needs. We parse the raw JSON rather
than a ``transformers`` config object so both the old (``rope_theta`` + ``rope_scaling``) and the
new (``rope_parameters``) layouts load, whatever Transformers version the user has.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
    "Qwen3VLForConditionalGeneration": "qwen3",
    "Gemma3ForConditionalGeneration": "gemma3",
}
# Vision-language checkpoints: their language model is one of the families above (read from
# ``text_config``); the vision tower is described by ``vision.py``'s ``VisionSpec``.
VISION_ARCHITECTURES = {
    "Qwen3VLForConditionalGeneration": "qwen3_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
    "Gemma3ForConditionalGeneration": "gemma3",
}
# The language model of each vision-language family, read as this text architecture.
_VISION_TEXT_ARCHITECTURES = {
    "qwen3_vl": "Qwen3ForCausalLM",
    "qwen2_5_vl": "Qwen2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


class ModelConfigError(ValueError):
    """A checkpoint folder or its config.json is missing, malformed or unsupported."""


class RopeSpec(BaseModel):
    """RoPE parameters for one kind of layer (Gemma-3 has one for sliding and one for global)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    theta: float
    rope_type: Literal["default", "llama3", "linear"] = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


class ModelArch(BaseModel):
    """Everything our decoder needs to know about a checkpoint's geometry and quirks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: Literal["llama", "mistral", "qwen2", "qwen3", "gemma3"]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    # Per-layer kind: "full" or "sliding". Sliding layers see only the last `sliding_window` keys.
    layer_types: tuple[Literal["full", "sliding"], ...]
    sliding_window: int | None = None
    rope_full: RopeSpec
    rope_sliding: RopeSpec | None = None
    # Gemma-3 only: query scale from `query_pre_attn_scalar`, logit soft-capping.
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    # Vision-language checkpoints: which vision family, Qwen-VL's multimodal RoPE sections
    # (frequencies per temporal/height/width axis: interleaved as Qwen3-VL does, or in three
    # contiguous runs as Qwen2.5-VL does) and how many early layers receive Qwen3-VL's DeepStack
    # visual features.
    vision_family: Literal["qwen3_vl", "qwen2_5_vl", "gemma3"] | None = None
    mrope_section: tuple[int, int, int] | None = None
    is_mrope_interleaved: bool = True
    num_deepstack_layers: int = 0

    @property
    def is_gemma(self) -> bool:
        return self.family == "gemma3"

    @property
    def has_qk_norm(self) -> bool:
        return self.family in ("qwen3", "gemma3")

    @property
    def activation(self) -> str:
        return "gelu_tanh" if self.is_gemma else "silu"

    @property
    def embed_scale(self) -> float:
        # Gemma scales embeddings by sqrt(hidden); the others do not.
        return math.sqrt(self.hidden_size) if self.is_gemma else 1.0

    @property
    def attn_scale(self) -> float:
        scalar = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
        return scalar**-0.5

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def rope_for_layer(self, layer: int) -> RopeSpec:
        if self.layer_types[layer] == "sliding" and self.rope_sliding is not None:
            return self.rope_sliding
        return self.rope_full

    def window_for_layer(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == "sliding" else None

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelArch":
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ModelConfigError(f"{path}: no config.json (is this a Hugging Face checkpoint folder?)")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as exc:
            raise ModelConfigError(f"{cfg_file}: not valid JSON ({exc})") from exc
        return cls.from_hf_dict(raw, source=str(cfg_file))

    @classmethod
    def from_hf_dict(cls, raw: dict, source: str = "config.json") -> "ModelArch":
        archs = raw.get("architectures") or []
        vision_family = next((VISION_ARCHITECTURES[a] for a in archs if a in VISION_ARCHITECTURES), None)
        if vision_family is not None:
            return _vision_language_arch(cls, raw, archs, vision_family, source)
        family = None
        for name in archs:
            family = SUPPORTED_ARCHITECTURES.get(name)
            if family:
                break
        if family is None:
            mt = raw.get("model_type")
            by_type = {
                "llama": "llama",
                "mistral": "mistral",
                "qwen2": "qwen2",
                "qwen3": "qwen3",
                "gemma3_text": "gemma3",
            }
            family = by_type.get(mt) if not archs else None
        if family is None:
            raise ModelConfigError(
                f"{source}: unsupported architecture {archs or raw.get('model_type')!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def need(key: str):
            if key not in raw:
                raise ModelConfigError(f"{source}: missing required field {key!r}")
            return raw[key]

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        num_layers = need("num_hidden_layers")
        head_dim = raw.get("head_dim") or hidden // heads
        layer_types = _layer_types(raw, family, num_layers)
        rope_full, rope_sliding = _rope_specs(raw, family, source)
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        window = raw.get("sliding_window") if "sliding" in layer_types else None
        return cls(
            family=family,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=raw.get("tie_word_embeddings", family == "gemma3"),
            qkv_bias=family == "qwen2" or bool(raw.get("attention_bias", False)),
            layer_types=layer_types,
            sliding_window=window,
            rope_full=rope_full,
            rope_sliding=rope_sliding,
            query_pre_attn_scalar=raw.get("query_pre_attn_scalar") if family == "gemma3" else None,
            final_logit_softcapping=raw.get("final_logit_softcapping") if family == "gemma3" else None,
            eos_token_ids=eos_ids,
            bos_token_id=raw.get("bos_token_id"),
        )


def _layer_types(raw: dict, family: str, num_layers: int) -> tuple[str, ...]:
    types = raw.get("layer_types")
    if types:
        if len(types) != num_layers:
            raise ModelConfigError(f"layer_types has {len(types)} entries for {num_layers} layers")
        return tuple("sliding" if t == "sliding_attention" else "full" for t in types)
    if family == "gemma3":
        # Older Gemma-3 configs give only the pattern: every Nth layer is global.
        pattern = raw.get("sliding_window_pattern", raw.get("_sliding_window_pattern", 6))
        return tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(num_layers))
    if family == "mistral" and raw.get("sliding_window"):
        return ("sliding",) * num_layers
    if family in ("qwen2", "qwen3") and raw.get("use_sliding_window") and raw.get("sliding_window"):
        first = raw.get("max_window_layers", num_layers)
        return tuple("sliding" if i >= first else "full" for i in range(num_layers))
    return ("full",) * num_layers


def _rope_spec(params: dict | None, theta_default: float, source: str) -> RopeSpec:
    params = dict(params or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelConfigError(f"{source}: unsupported rope_type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
    fields = {
        k: params[k]
        for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if k in params and params[k] is not None
    }
    return RopeSpec(theta=params.get("rope_theta", theta_default), rope_type=rope_type, **fields)


def _rope_specs(raw: dict, family: str, source: str) -> tuple[RopeSpec, RopeSpec | None]:
    theta = raw.get("rope_theta", 1_000_000.0 if family == "gemma3" else 10_000.0)
    params = raw.get("rope_parameters")
    if family == "gemma3":
        if params and "full_attention" in params:
            full = _rope_spec(params["full_attention"], theta, source)
            sliding = _rope_spec(params.get("sliding_attention"), raw.get("rope_local_base_freq", 10_000.0), source)
        else:
            full = _rope_spec(raw.get("rope_scaling") or params, theta, source)
            sliding = RopeSpec(theta=raw.get("rope_local_base_freq", 10_000.0))
        return full, sliding
    if params:
        return _rope_spec(params, theta, source), None
    return _rope_spec(raw.get("rope_scaling"), theta, source), None


def _vision_language_arch(cls, raw: dict, archs: list, vision_family: str, source: str) -> ModelArch:
    """The language model of a vision-language checkpoint: ``text_config`` read as a text config,
    plus the top-level fields that stay outside it (tied embeddings, end-of-sequence ids)."""
    # Qwen2.5-VL checkpoints as published keep the language model's fields at the top level.
    text = dict(raw.get("text_config") or {k: v for k, v in raw.items() if k != "vision_config"})
    text["architectures"] = [_VISION_TEXT_ARCHITECTURES[vision_family]]
    for key in ("tie_word_embeddings", "eos_token_id", "bos_token_id"):
        if key in raw and (key == "tie_word_embeddings" or key not in text):
            text[key] = raw[key]
    rope_key = "rope_parameters" if text.get("rope_parameters") else "rope_scaling"
    mrope = dict(text.get(rope_key) or {})
    if vision_family == "qwen2_5_vl" and mrope.get("type", mrope.get("rope_type")) == "mrope":
        # The published configs name the multimodal RoPE "mrope": per axis, ordinary RoPE.
        text[rope_key] = {k: v for k, v in mrope.items() if k not in ("type", "rope_type")}
    base = cls.from_hf_dict(text, source)
    extra: dict = {"vision_family": vision_family}
    if vision_family == "qwen2_5_vl":
        section = mrope.get("mrope_section", (16, 24, 24))  # Transformers' default
        if len(section) != 3 or sum(section) != base.head_dim // 2:
            raise ModelConfigError(
                f"{source}: Qwen2.5-VL's mrope_section {section} must be 3 sizes covering head_dim/2 = {base.head_dim // 2}"
            )
        extra.update(mrope_section=tuple(section), is_mrope_interleaved=False)
    if vision_family == "qwen3_vl":
        # Transformers' defaults where a saved config leaves them out: sections (24, 20, 20), three
        # DeepStack layers (vision blocks 8, 16 and 24).
        params = text.get("rope_parameters") or text.get("rope_scaling") or {}
        section = params.get("mrope_section", (24, 20, 20))
        if len(section) != 3 or not params.get("mrope_interleaved", True):
            raise ModelConfigError(f"{source}: Qwen3-VL needs interleaved rope_parameters.mrope_section of 3 sizes")
        if sum(section) != base.head_dim // 2:
            raise ModelConfigError(
                f"{source}: mrope_section {section} does not cover head_dim/2 = {base.head_dim // 2}"
            )
        extra["mrope_section"] = tuple(section)
        extra["num_deepstack_layers"] = len(
            (raw.get("vision_config") or {}).get("deepstack_visual_indexes", (8, 16, 24))
        )
    return base.model_copy(update=extra)
