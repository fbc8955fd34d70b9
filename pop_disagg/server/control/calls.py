"""What the request plane takes and gives: a validated ``GenerateCall`` in, ``Delta``s and one
``GenerateResult`` out. Plain dataclasses; the front ends convert them to and from their wire
formats (``frontend/protocol.py`` for protobuf, ``frontend/http_api.py`` for OpenAI JSON)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...engine.sampling import SamplingParams, TokenLogprob
from ...models.multimodal import ImageKeys


@dataclass(frozen=True)
class GenerateCall:
    """A validated request: the router's input."""

    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str | None
    plan_index: int | None = (
        None  # the request's plan in the served family (from its prune_ratio); None: the server picks
    )
    deadline: float | None = None  # wall clock (time.time()) from the client's deadline; None = none
    # Vision-language models: the prompt's images as the checkpoint's image processor left them
    # (``models.vision.ProcessedImage``), the position offset of tokens after the prompt
    # (Qwen-VL's multimodal RoPE), and their spans and content digests (``multimodal.ImageKeys``,
    # which name the prompt's blocks in the prefix caches): all the decode side gets of the images.
    images: tuple = ()
    mrope_delta: int = 0
    image_keys: ImageKeys | None = None


@dataclass
class Delta:
    """New text and tokens of a streaming request."""

    request_id: str
    text: str
    token_ids: list[int]
    # One per token of token_ids when the request asked for logprobs (params.logprobs), else None.
    # Computed by the decode worker's engine for every token (the boundary token's included).
    logprobs: list[TokenLogprob] | None = None
    # A scoring request's prompt scores (one per prompt token, None where unscored), on its first delta.
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Timings:
    """Seconds; see ``Timings`` in generation.proto."""

    queue_s: float = 0.0
    prefill_s: float = 0.0
    transfer_s: float = 0.0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    prune_ratio: float | None = None  # the family ratio the prefill ran; None: no prefill
    num_skipped_layers: int = 0


@dataclass
class GenerateResult:
    """A finished request (unary) or the last chunk of a stream (then ``token_ids``/``text`` are the delta)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    timings: Timings = field(default_factory=Timings)
    logprobs: list[TokenLogprob] | None = None  # as in Delta: aligned with token_ids
    num_cached_tokens: int = 0  # of the prompt, found in the engine's prefix cache
    prompt_logprobs: list[TokenLogprob | None] | None = None  # a scoring request's, whole (see Delta)
