"""The one place where protobuf messages meet internal dataclasses.

``parse_generate`` validates a ``GenerateRequest`` against the served model and returns a
``GenerateCall`` or raises ``InvalidRequest`` whose message starts with the offending field (the
servicer answers ``INVALID_ARGUMENT`` with it). ``to_response`` / ``to_stream_chunk`` turn the
router's results back into messages. Nothing else in the server touches generated classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pydantic import ValidationError

from .._proto import generation_pb2 as pb
from ..engine.sampling import SamplingParams

DEFAULT_MAX_NEW_TOKENS = 64

FINISH_REASONS = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}


class InvalidRequest(ValueError):
    """A request the server will not run; ``str(exc)`` names the field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field_name = field_name


@dataclass(frozen=True)
class ModelLimits:
    """What validation needs to know about the served model."""

    vocab_size: int
    context_limit: int
    prune_ratios: tuple[float, ...] = ()  # the served plan family; a request's prune_ratio must be one of them


@dataclass(frozen=True)
class GenerateCall:
    """A validated request: the router's input."""

    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str | None
    prune_ratio: float | None = None  # one of ModelLimits.prune_ratios (the served value, not the wire's); None: the server picks
    deadline: float | None = None  # wall clock (time.time()) from the client's deadline; None = none


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


def parse_generate(msg: pb.GenerateRequest, tokenizer, limits: ModelLimits) -> GenerateCall:
    has_text, has_ids = bool(msg.prompt), len(msg.prompt_token_ids) > 0
    if has_text and has_ids:
        raise InvalidRequest("prompt", "set exactly one of prompt and prompt_token_ids, not both")
    if not has_text and not has_ids:
        raise InvalidRequest("prompt", "empty prompt: set prompt or prompt_token_ids")
    if has_ids:
        ids = list(msg.prompt_token_ids)
        bad = [t for t in ids if not 0 <= t < limits.vocab_size]
        if bad:
            raise InvalidRequest("prompt_token_ids", f"ids {bad[:5]} outside the vocabulary [0, {limits.vocab_size})")
    else:
        ids = list(tokenizer.encode(msg.prompt))
        if not ids:
            raise InvalidRequest("prompt", "the prompt tokenizes to zero tokens")
    if len(ids) >= limits.context_limit:
        raise InvalidRequest("prompt", f"{len(ids)} tokens exceeds the context limit of {limits.context_limit} (room is needed for at least one new token)")
    max_new = msg.max_new_tokens if msg.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS
    if max_new <= 0:
        raise InvalidRequest("max_new_tokens", f"must be >= 1, got {max_new}")
    if len(ids) + max_new > limits.context_limit:
        raise InvalidRequest("max_new_tokens", f"{len(ids)} prompt + {max_new} new tokens exceeds the context limit of {limits.context_limit}")
    temperature = msg.temperature if msg.HasField("temperature") else 0.0
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidRequest("temperature", f"must be a finite number >= 0, got {temperature}")
    top_p = msg.top_p if msg.HasField("top_p") else 1.0
    if not 0.0 < top_p <= 1.0:
        raise InvalidRequest("top_p", f"must be in (0, 1], got {top_p}")
    top_k = msg.top_k if msg.HasField("top_k") else 0
    if top_k < 0:
        raise InvalidRequest("top_k", f"must be >= 0, got {top_k}")
    bad_stop = [t for t in msg.stop_token_ids if not 0 <= t < limits.vocab_size]
    if bad_stop:
        raise InvalidRequest("stop_token_ids", f"ids {bad_stop[:5]} outside the vocabulary [0, {limits.vocab_size})")
    if any(s == "" for s in msg.stop):
        raise InvalidRequest("stop", "stop strings must be non-empty")
    try:
        params = SamplingParams(
            max_new_tokens=max_new, temperature=temperature, top_p=top_p, top_k=top_k,
            seed=msg.seed if msg.HasField("seed") else None, stop=tuple(msg.stop),
            stop_token_ids=tuple(msg.stop_token_ids), ignore_eos=msg.ignore_eos,
        )
    except ValidationError as exc:  # anything the checks above missed still names its field
        err = exc.errors()[0]
        raise InvalidRequest(str(err["loc"][0]) if err["loc"] else "request", err["msg"]) from exc
    request_id = msg.request_id if msg.HasField("request_id") else None
    if request_id is not None and not request_id:
        raise InvalidRequest("request_id", "must be non-empty when set")
    return GenerateCall(ids, params, request_id, _prune_ratio(msg, limits))


def _prune_ratio(msg: pb.GenerateRequest, limits: ModelLimits) -> float | None:
    if not msg.HasField("prune_ratio"):
        return None
    value = msg.prune_ratio
    for served in limits.prune_ratios:
        if math.isfinite(value) and abs(served - value) <= 1e-4:
            return served
    allowed = ", ".join(f"{r:g}" for r in limits.prune_ratios)
    raise InvalidRequest("prune_ratio", f"{value:g} is not served; allowed: {allowed}")


def _timings(t: Timings) -> pb.Timings:
    return pb.Timings(queue_s=t.queue_s, prefill_s=t.prefill_s, transfer_s=t.transfer_s, ttft_s=t.ttft_s, decode_s=t.decode_s,
                      prune_ratio=t.prune_ratio, num_skipped_layers=t.num_skipped_layers)


def to_response(r: GenerateResult) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=r.request_id, text=r.text, token_ids=r.token_ids, finish_reason=FINISH_REASONS[r.finish_reason],
        usage=pb.Usage(prompt_tokens=r.num_prompt_tokens, completion_tokens=r.num_output_tokens), timings=_timings(r.timings),
    )


def to_stream_chunk(request_id: str, text: str, token_ids: list[int]) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(request_id=request_id, text=text, token_ids=token_ids)


def to_last_chunk(r: GenerateResult) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(
        request_id=r.request_id, text=r.text, token_ids=r.token_ids, finish_reason=FINISH_REASONS[r.finish_reason],
        usage=pb.Usage(prompt_tokens=r.num_prompt_tokens, completion_tokens=r.num_output_tokens), timings=_timings(r.timings),
    )


def finish_reason_name(value: int) -> str | None:
    return {v: k for k, v in FINISH_REASONS.items()}[value]
