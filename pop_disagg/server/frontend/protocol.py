"""The one place where protobuf messages meet internal dataclasses.

``parse_generate`` turns a ``GenerateRequest`` into a ``GenerateCall``, applying the request rules
of ``pop_disagg/limits.py`` (the served model's limits, the plan a ``prune_ratio`` names) and the
sampling ranges, or raises ``InvalidRequest`` whose message starts with the offending field (gRPC
answers ``INVALID_ARGUMENT`` with it; the HTTP front end builds a ``GenerateRequest`` and comes
here too, so both refuse the same requests). ``to_response`` / ``to_stream_chunk`` turn the
router's results back into messages. Nothing else in the server touches generated classes.
"""

from __future__ import annotations

import math

from pydantic import ValidationError

from ..._proto import generation_pb2 as pb
from ...engine.sampling import SamplingParams
from ...limits import InvalidRequest, ModelLimits
from ..control.calls import GenerateCall, GenerateResult, Timings

DEFAULT_MAX_NEW_TOKENS = 64

FINISH_REASONS = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}


def parse_generate(
    msg: pb.GenerateRequest, tokenizer, limits: ModelLimits, media=None, images: list | None = None
) -> GenerateCall:
    """``media``: the served model's image rules (``multimodal.MediaEdge``; None: no images).
    ``images``: images already processed at the edge (the HTTP front end), instead of ``msg.images``."""
    has_text, has_ids = bool(msg.prompt), len(msg.prompt_token_ids) > 0
    if has_text and has_ids:
        raise InvalidRequest("prompt", "set exactly one of prompt and prompt_token_ids, not both")
    if not has_text and not has_ids:
        raise InvalidRequest("prompt", "empty prompt: set prompt or prompt_token_ids")
    images = list(images or [])
    if msg.images:
        if media is None:
            raise InvalidRequest("images", "the served model takes no images")
        images = media.process([(data, None) for data in msg.images], "images")
    if has_ids:
        ids = list(msg.prompt_token_ids)
        limits.check_prompt(ids)
    elif images:
        ids = media.prompt(tokenizer, msg.prompt, images, add_special_tokens=True)
        limits.check_prompt(ids, field_name="prompt")
    else:
        ids = list(tokenizer.encode(msg.prompt))
        if not ids:
            raise InvalidRequest("prompt", "the prompt tokenizes to zero tokens")
        limits.check_prompt(ids, field_name="prompt")
    if media is not None:
        media.for_ids(ids, images)
    max_new = msg.max_new_tokens if msg.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS
    limits.check_max_new_tokens(len(ids), max_new)
    temperature = msg.temperature if msg.HasField("temperature") else 0.0
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidRequest("temperature", f"must be a finite number >= 0, got {temperature}")
    top_p = msg.top_p if msg.HasField("top_p") else 1.0
    if not 0.0 < top_p <= 1.0:
        raise InvalidRequest("top_p", f"must be in (0, 1], got {top_p}")
    top_k = msg.top_k if msg.HasField("top_k") else 0
    if top_k < 0:
        raise InvalidRequest("top_k", f"must be >= 0, got {top_k}")
    if any(s == "" for s in msg.stop):
        raise InvalidRequest("stop", "stop strings must be non-empty")
    # Optional fields the message leaves unset take SamplingParams' defaults; its validators hold
    # the ranges (penalties, min_tokens <= max_new_tokens, logit_bias values, logprobs count).
    optional = ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "logprobs")
    optional += ("skip_special_tokens",)
    try:
        params = SamplingParams(
            max_new_tokens=max_new,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=msg.seed if msg.HasField("seed") else None,
            stop=tuple(msg.stop),
            stop_token_ids=tuple(msg.stop_token_ids),
            ignore_eos=msg.ignore_eos,
            logit_bias=dict(msg.logit_bias),
            **{name: getattr(msg, name) for name in optional if msg.HasField(name)},
        )
    except ValidationError as exc:  # the range checks, naming their field
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "request"
        if name == "request" and "min_tokens" in err["msg"]:  # the cross-field check
            name = "min_tokens"
        raise InvalidRequest(name, err["msg"].removeprefix("Value error, ")) from exc
    limits.check_params(params)
    request_id = msg.request_id if msg.HasField("request_id") else None
    if request_id is not None and not request_id:
        raise InvalidRequest("request_id", "must be non-empty when set")
    plan_index = limits.plan_index(msg.prune_ratio if msg.HasField("prune_ratio") else None)
    delta = media.mrope_delta(ids, images) if images else 0
    keys = media.image_keys(ids, images) if images else None
    return GenerateCall(ids, params, request_id, plan_index, images=tuple(images), mrope_delta=delta, image_keys=keys)


def updated_params(params: SamplingParams, field_name: str, **update) -> SamplingParams:
    """``params`` with ``update`` applied, validated again: ``InvalidRequest`` naming the field at
    fault (``field_name`` for a check across fields). For what the HTTP API adds beyond the message."""
    try:
        return SamplingParams(**{**params.model_dump(), **update})
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else field_name
        raise InvalidRequest(name, err["msg"].removeprefix("Value error, ")) from None


def _timings(t: Timings) -> pb.Timings:
    return pb.Timings(
        queue_s=t.queue_s,
        prefill_s=t.prefill_s,
        transfer_s=t.transfer_s,
        ttft_s=t.ttft_s,
        decode_s=t.decode_s,
        prune_ratio=t.prune_ratio,
        num_skipped_layers=t.num_skipped_layers,
    )


def _logprobs(logprobs) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top_logprobs=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
        )
        for lp in logprobs or ()
    ]


def _result_fields(r: GenerateResult) -> dict:
    """The fields a unary response and a stream's last chunk share (they carry the same result)."""
    return dict(
        request_id=r.request_id,
        text=r.text,
        token_ids=r.token_ids,
        finish_reason=FINISH_REASONS[r.finish_reason],
        usage=pb.Usage(
            prompt_tokens=r.num_prompt_tokens,
            completion_tokens=r.num_output_tokens,
            cached_tokens=r.num_cached_tokens,
        ),
        timings=_timings(r.timings),
        logprobs=_logprobs(r.logprobs),
    )


def to_response(r: GenerateResult) -> pb.GenerateResponse:
    return pb.GenerateResponse(**_result_fields(r))


def to_stream_chunk(request_id: str, text: str, token_ids: list[int], logprobs=None) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(
        request_id=request_id, text=text, token_ids=token_ids, logprobs=_logprobs(logprobs)
    )


def to_last_chunk(r: GenerateResult) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(**_result_fields(r))


def finish_reason_name(value: int) -> str | None:
    return {v: k for k, v in FINISH_REASONS.items()}[value]
