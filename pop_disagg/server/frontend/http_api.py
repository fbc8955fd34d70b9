"""The OpenAI-compatible HTTP front end: the same router as gRPC, on the same event loop.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health`` (200 serving / 503 not), ``GET /metrics`` (Prometheus text, when the server has
metrics), and vLLM's ``/tokenize``, ``/detokenize``, ``/version`` (``tokenize_api.py``). Chat
messages and their template live in ``chat.py``, generated tokens' logprobs in OpenAI's shapes in
``openai_logprobs.py``, and fields beyond the request models are sorted (accepted with a warning,
or refused naming them) by ``openai_fields.py``. FastAPI parses the bodies into the pydantic models below; uvicorn serves the app as a task
on the gRPC server's loop (``HttpFrontEnd``), so both front ends share one ``Router``.

Life of a request:

1. The guard (an ASGI middleware) refuses bodies over ``MAX_BODY_BYTES`` (413) and, when the server
   has an ``auth_token``, ``/v1/*`` calls without ``Authorization: Bearer <token>`` (401).
2. The body becomes a ``pb.GenerateRequest`` and goes through ``protocol.parse_generate``: the gRPC
   API's own validation, so both front ends refuse the same requests; the field it names is
   renamed to the OpenAI parameter (``max_new_tokens`` -> ``max_tokens``, ...). Chat messages are
   rendered with the tokenizer's chat template first.
3. Unary: ``router.generate``. Streaming: the first item of ``router.stream`` is awaited before the
   response starts, so a refusal (429 overloaded, 503 draining / no worker) still gets its status;
   then Server-Sent Events in OpenAI's chunk format, ending with ``data: [DONE]``.
4. A client that disconnects cancels the router call (unary, or before the first token) or closes
   the router's stream (mid-stream); either way the router aborts the request on both workers.

Errors are OpenAI's object ``{"error": {"message", "type", "param", "code"}}``: the status and type
come from ``errors.ServingError`` (``http_status``, ``openai_type``); a ``ValueError`` is a 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import socket
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ..._proto import generation_pb2 as pb
from ...limits import InvalidRequest, ModelLimits
from ..control.calls import GenerateCall, GenerateResult
from ..errors import ServingError, Unauthenticated
from . import fanout, openai_fields, protocol, scoring, structured_output, tokenize_api
from .chat import ChatMessage, render_chat, render_chat_text
from .openai_logprobs import LogprobsRenderer

log = logging.getLogger("pop_disagg.serve")

MAX_BODY_BYTES = 4 << 20  # gRPC's default receive limit: both front ends take the same requests
MAX_N = 16  # samples per request at most: each is a request of its own (blocks, a decode slot)
MAX_PROMPTS = 64  # prompts in one completions request (a batch, as lm-eval sends): one request each
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default (the gRPC API defaults to greedy)


# ---- request bodies ------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: with include_usage, usage on every chunk too


class _SamplingRequest(BaseModel):
    """Options shared by both endpoints. Fields beyond these are sorted by ``openai_fields``
    (ignored with a warning, or refused naming the field)."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, description=f"default {protocol.DEFAULT_MAX_NEW_TOKENS}, as the gRPC API")
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # Extensions (vLLM spells them the same way).
    top_k: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    return_token_ids: bool = Field(False, description="add the generated token ids to every choice")
    prune_ratio: float | None = Field(
        None,
        description="POP depth: one of the served family's ratios (GetModelInfo.prune_ratios); default: the server's choice",
    )
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    skip_special_tokens: bool = True
    # Structured output (structured_output.py): at most one of these.
    response_format: structured_output.ResponseFormat | None = None
    structured_outputs: structured_output.StructuredOutputs | None = None
    guided_json: dict | str | None = None
    guided_choice: list[str] | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = Field(False, description="the prompt before the text; with logprobs, scored (scoring.py)")
    best_of: int | None = None
    prompt_logprobs_mode: scoring.Mode | None = Field(None, description="with echo + logprobs: full (default) | pop")
    num_context_tokens: int | None = Field(None, description='with prompt_logprobs_mode "pop": the context length')

    @property
    def is_prompt_only(self) -> bool:
        """``echo`` with ``max_tokens: 0``: the prompt (scored) without a completion."""
        return self.echo and self.max_tokens == 0


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None


# ---- errors --------------------------------------------------------------------------------------
class OpenAIError(Exception):
    """A refusal with OpenAI's error fields (for what has no ``ServingError`` class)."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code


class _ClientGone(Exception):
    """The client disconnected before the answer was ready."""


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error(
    status: int, message: str, type_: str, param: str | None = None, code: str | int | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


def error_of(exc: Exception) -> tuple[int, dict]:
    """(HTTP status, OpenAI error object) for anything a request can raise."""
    if isinstance(exc, OpenAIError):
        return exc.status, error_body(str(exc), exc.type, exc.param, exc.code)
    if isinstance(exc, InvalidRequest):
        return 400, error_body(str(exc), "invalid_request_error", exc.field_name)
    if isinstance(exc, ValueError):
        return 400, error_body(str(exc), "invalid_request_error")
    if isinstance(exc, ServingError):
        return exc.http_status, error_body(str(exc), exc.openai_type)
    return 500, error_body(f"{exc.__class__.__name__}: {exc}", "internal_error")


def _param_of(loc: tuple) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``"messages[0].role"``; union type tags are dropped."""
    if len(loc) < 2 or not isinstance(loc[1], str):
        return None
    param = loc[1]
    if len(loc) > 2 and isinstance(loc[2], int):
        param += f"[{loc[2]}]"
        if len(loc) > 3 and isinstance(loc[3], str) and loc[3].isidentifier():
            param += f".{loc[3]}"
    return param


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        return _error(
            400, f"malformed JSON body: {err.get('ctx', {}).get('error', err['msg'])}", "invalid_request_error"
        )
    param = _param_of(tuple(err["loc"]))
    if err["type"] == "extra_forbidden":
        return _error(400, f"{param}: unrecognized request argument", "invalid_request_error", param)
    if param is None:
        return _error(400, f"request body: {err['msg']}", "invalid_request_error")
    return _error(400, f"{param}: {err['msg']}", "invalid_request_error", param)


# ---- request -> GenerateCall ---------------------------------------------------------------------
def _unsupported(req: _SamplingRequest) -> None:
    """Refuse what the engine does not do yet, naming the parameter, rather than ignore it."""
    checks = [("n", not 1 <= req.n <= MAX_N, f"must be in [1, {MAX_N}], got {req.n}")]
    if isinstance(req, CompletionRequest):
        checks += [
            ("best_of", req.best_of not in (None, req.n), "only best_of == n is supported (no ranking of samples)"),
        ]
    else:
        checks += [("top_logprobs", req.top_logprobs is not None and not req.logprobs, "needs logprobs: true")]
    for param, is_bad, why in checks:
        if is_bad:
            raise InvalidRequest(param, why)
    openai_fields.check_extra(req.model_extra, is_chat=isinstance(req, ChatCompletionRequest))


def logprobs_count(req: _SamplingRequest) -> int | None:
    """How many top logprobs per token the request asks for (None: no logprobs)."""
    if isinstance(req, CompletionRequest):
        return req.logprobs
    return (req.top_logprobs or 0) if req.logprobs else None


def _set(msg: pb.GenerateRequest, field: str, value, param: str) -> None:
    try:
        if isinstance(value, list):
            getattr(msg, field).extend(value)
        else:
            setattr(msg, field, value)
    except (ValueError, TypeError) as exc:  # out of the wire type's range (int32, int64)
        raise InvalidRequest(param, f"value out of range ({exc})") from None


def to_generate_request(
    req: _SamplingRequest, prompt: str | None, prompt_ids: list[int] | None
) -> tuple[pb.GenerateRequest, dict[str, str]]:
    """The gRPC message for ``req`` and the renaming of its fields to OpenAI's parameters."""
    is_chat = isinstance(req, ChatCompletionRequest)
    max_param = "max_completion_tokens" if is_chat and req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if max_param == "max_completion_tokens" else req.max_tokens
    msg = pb.GenerateRequest(ignore_eos=req.ignore_eos)
    if prompt is not None:
        msg.prompt = prompt
    if prompt_ids is not None:
        _set(msg, "prompt_token_ids", prompt_ids, "prompt")
    if max_tokens is not None:  # echo with max_tokens 0: one token is generated and dropped
        _set(msg, "max_new_tokens", 1 if not is_chat and req.is_prompt_only else max_tokens, max_param)
    _set(msg, "temperature", DEFAULT_TEMPERATURE if req.temperature is None else req.temperature, "temperature")
    if req.top_p is not None:
        _set(msg, "top_p", req.top_p, "top_p")
    if req.top_k is not None:
        _set(msg, "top_k", req.top_k, "top_k")
    if req.seed is not None:
        _set(msg, "seed", req.seed, "seed")
    if req.stop is not None:
        msg.stop.extend([req.stop] if isinstance(req.stop, str) else req.stop)
    if req.stop_token_ids:
        _set(msg, "stop_token_ids", req.stop_token_ids, "stop_token_ids")
    if req.prune_ratio is not None:
        _set(msg, "prune_ratio", req.prune_ratio, "prune_ratio")
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "skip_special_tokens"):
        _set(msg, name, getattr(req, name), name)
    for key, bias in (req.logit_bias or {}).items():
        try:
            msg.logit_bias[int(key)] = bias
        except (ValueError, TypeError):  # int32 overflow included
            raise InvalidRequest("logit_bias", f"keys must be token ids, got {key!r}") from None
    if (k := logprobs_count(req)) is not None:
        _set(msg, "logprobs", k, "logprobs")
    prompt_param = "messages" if is_chat else "prompt"
    rename = {"max_new_tokens": max_param, "prompt": prompt_param, "prompt_token_ids": prompt_param}
    if is_chat and req.top_logprobs is not None:
        rename["logprobs"] = "top_logprobs"
    return msg, rename


def _prompts(req: _SamplingRequest, tokenizer) -> list[tuple[str | None, list[int] | None]]:
    """(text, ids) of each prompt, exactly one of them set: chat has one, completions one or a batch."""
    if isinstance(req, ChatCompletionRequest):
        return [(None, render_chat(tokenizer, req.messages))]
    p = req.prompt
    if isinstance(p, str):
        return [(p, None)]
    if not p or isinstance(p[0], int):
        return [(None, list(p))]
    if len(p) > MAX_PROMPTS:
        raise InvalidRequest("prompt", f"a batch of at most {MAX_PROMPTS} prompts, got {len(p)}")
    return [(x, None) if isinstance(x, str) else (None, list(x)) for x in p]


def parse_calls(
    req: _SamplingRequest, tokenizer, limits: ModelLimits, check_grammar=None, media=None
) -> list[tuple[GenerateCall, str | None]]:
    """One call per prompt (with the prompt's text, when it came as text), validated with the gRPC
    API's rules (``protocol.parse_generate``), naming OpenAI's parameters; completions' prompt
    scoring added (``scoring.scoring_params``), and structured output, its spec compiled here by
    ``check_grammar`` (``structured_output.EdgeCheck``). ``media``: the served model's image rules
    (``multimodal.MediaEdge``), for chat image parts."""
    _unsupported(req)
    structured = structured_output.spec_of(req)
    if structured is not None:
        check_grammar(*structured)
    images = []
    if isinstance(req, ChatCompletionRequest) and media is not None and media.inputs is not None:
        images = media.chat_images(req.messages)
        text = render_chat_text(tokenizer, req.messages, image_placeholder=media.spec.placeholder)
        prompts = [(None, media.prompt(tokenizer, text, images, add_special_tokens=False))]
    else:
        prompts = _prompts(req, tokenizer)
    calls = []
    for prompt, prompt_ids in prompts:
        msg, rename = to_generate_request(req, prompt, prompt_ids)
        try:
            call = protocol.parse_generate(msg, tokenizer, limits, media, images)
        except InvalidRequest as exc:
            param = rename.get(exc.field_name, exc.field_name)
            raise InvalidRequest(param, str(exc).split(": ", 1)[1]) from None
        if isinstance(req, CompletionRequest):
            params = scoring.scoring_params(req, call.params, len(call.prompt_token_ids), limits)
            call = dataclasses.replace(call, params=params)
        if structured is not None:
            params = protocol.updated_params(call.params, structured[1], structured=structured[0])
            call = dataclasses.replace(call, params=params)
        calls.append((call, prompt))
    return calls


# ---- responses -----------------------------------------------------------------------------------
def _usage(results: list[GenerateResult], n: int, is_prompt_only: bool = False) -> dict:
    """One request's usage: each prompt once (choice ``i * n`` is prompt ``i``'s first sample), the
    completion tokens of every choice (OpenAI's for n > 1; none for an echoed prompt alone);
    ``cached_tokens``: the prompt tokens the prefix cache held."""
    firsts = results[::n]
    prompt = sum(r.num_prompt_tokens for r in firsts)
    completion = 0 if is_prompt_only else sum(r.num_output_tokens for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(r.num_cached_tokens for r in firsts)},
    }


class _Render:
    """OpenAI's JSON for one request: unary body and stream chunks (completion or chat). Choice
    ``i * n + j`` is sample ``j`` of prompt ``i``."""

    def __init__(self, req: _SamplingRequest, model: str, tokenizer, calls: list[GenerateCall], texts: list):
        self.is_chat = isinstance(req, ChatCompletionRequest)
        self.model, self.created = model, int(time.time())
        self.id = f"{'chatcmpl' if self.is_chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.return_token_ids = req.return_token_ids
        opts = req.stream_options
        self.include_usage = bool(opts and opts.include_usage)
        self.continuous_usage = self.include_usage and opts.continuous_usage_stats  # as vLLM: both needed
        self.n = req.n
        self.calls = calls  # one per choice
        # Echo (completions): the prompt before the text, as sent (a token-id prompt decoded).
        self.is_echo = not self.is_chat and req.echo
        self.is_prompt_only = not self.is_chat and req.is_prompt_only
        if self.is_echo:
            self.echo_texts = [
                t if t is not None else tokenizer.decode(c.prompt_token_ids) for c, t in zip(calls, texts)
            ]
        # One logprobs renderer per choice (completions' text offsets are per choice).
        self.logprobs = (
            [LogprobsRenderer(tokenizer, self.is_chat) for _ in calls] if logprobs_count(req) is not None else None
        )
        self.num_prompt_tokens = sum(len(c.prompt_token_ids) for c in calls[:: self.n])
        self.num_streamed = 0

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _choice(self, index: int, item, finish_reason: str | None, *, is_delta: bool, is_first: bool = False) -> dict:
        text, token_ids, generated = item.text, list(item.token_ids), item.logprobs or []
        if self.is_prompt_only:  # the token generated to end the request is not part of the answer
            text, token_ids, generated, finish_reason = "", [], [], finish_reason and "length"
        logprobs = self.logprobs[index].render(generated) if self.logprobs is not None else None
        if self.is_echo and is_first:
            text = self.echo_texts[index] + text
            if self.logprobs is not None:
                # The prompt's entries go first: render them before the generated ones' offsets.
                renderer = self.logprobs[index]
                renderer.text_offset = 0
                head = scoring.echo_logprobs(renderer, self.calls[index].prompt_token_ids, item.prompt_logprobs)
                logprobs = scoring.joined(head, renderer.render(generated))
        if not self.is_chat:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        elif is_delta:
            choice = {
                "index": index,
                "delta": {"role": "assistant", "content": text} if is_first else {"content": text},
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        else:
            choice = {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        if self.return_token_ids:
            choice["token_ids"] = token_ids
        return choice

    def body(self, results: list[GenerateResult]) -> dict:
        out = self._head("chat.completion" if self.is_chat else "text_completion")
        choices = [self._choice(i, r, r.finish_reason, is_delta=False, is_first=True) for i, r in enumerate(results)]
        return {**out, "choices": choices, "usage": _usage(results, self.n, self.is_prompt_only)}

    def chunk(self, index: int, item, is_first: bool) -> dict | None:
        finish = item.finish_reason if isinstance(item, GenerateResult) else None
        if not self.is_prompt_only:
            self.num_streamed += len(item.token_ids)  # counted even when this chunk is held back
        shows_tokens = (self.return_token_ids or self.logprobs is not None) and item.token_ids
        if not (item.text or finish or is_first or shows_tokens):
            return None  # held back text (a possible stop string) with nothing to show
        out = self._head("chat.completion.chunk" if self.is_chat else "text_completion")
        out["choices"] = [self._choice(index, item, finish, is_delta=True, is_first=is_first)]
        if self.continuous_usage:
            n, m = self.num_prompt_tokens, self.num_streamed
            out["usage"] = {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}
        elif self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, results: list[GenerateResult]) -> dict:
        out = self._head("chat.completion.chunk" if self.is_chat else "text_completion")
        return {**out, "choices": [], "usage": _usage(results, self.n, self.is_prompt_only)}


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its body iterator however the response ends, so a disconnect closes the router's
    stream (which aborts the request on both workers) instead of leaving it to the garbage collector."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _events(streams: list, firsts: list, render: _Render):
    """The SSE body: every choice's chunks as they come (``fanout.merged``), the usage, ``[DONE]``."""
    items = fanout.merged(streams, firsts)
    is_first = [True] * len(streams)
    results: dict[int, GenerateResult] = {}
    try:
        async for i, item in items:
            chunk = render.chunk(i, item, is_first[i])
            if chunk is not None:
                yield _sse(chunk)
                is_first[i] = False
            if isinstance(item, GenerateResult):
                results[i] = item
        if render.include_usage:
            yield _sse(render.usage_chunk([results[i] for i in sorted(results)]))
    except Exception as exc:  # after the 200 went out, a failure can only be an event (as vLLM does)
        if not isinstance(exc, (ValueError, ServingError)):
            log.exception("stream failed")
        yield _sse(error_of(exc)[1])
    finally:
        await items.aclose()
        for s in streams:
            await s.aclose()
    yield _sse("[DONE]")


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(aw, request: Request):
    """``await aw``, cancelling it if the client goes away first (the router then aborts)."""
    work = asyncio.ensure_future(aw)
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        raise _ClientGone()
    return work.result()


# ---- the app -------------------------------------------------------------------------------------
def max_body_bytes(server) -> int:
    """``MAX_BODY_BYTES``, plus room for the base64 images a prompt may carry (vision-language models)."""
    media = getattr(server, "media", None)
    if media is None or media.spec is None:
        return MAX_BODY_BYTES
    return MAX_BODY_BYTES + media.config.max_images_per_prompt * (media.config.max_image_bytes * 4 // 3 + 64)


class _Guard:
    """ASGI middleware: body size limit for every request, bearer token for ``/v1/*``."""

    def __init__(self, app, server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        declared = headers.get("content-length", "0")
        limit = max_body_bytes(self.server)
        if declared.isdigit() and int(declared) > limit:  # refused before reading a byte of it
            too_large = _error(
                413,
                f"request body of {declared} bytes exceeds {limit} bytes",
                "invalid_request_error",
                code="request_too_large",
            )
            return await too_large(scope, receive, send)
        token = getattr(self.server, "auth_token", None)
        if token and scope["path"].startswith("/v1/"):
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
                exc = Unauthenticated("missing or wrong bearer token (Authorization: Bearer <token>)")
                return await _error(exc.http_status, str(exc), exc.openai_type, code="invalid_api_key")(
                    scope, receive, send
                )
        num_bytes = 0

        async def counted():  # chunked bodies have no Content-Length: count as they arrive
            nonlocal num_bytes
            message = await receive()
            if message["type"] == "http.request":
                num_bytes += len(message.get("body", b""))
                if num_bytes > limit:
                    raise HTTPException(413, f"request body exceeds {limit} bytes")
            return message

        await self.app(scope, counted, send)


def create_app(server) -> FastAPI:
    """The FastAPI app over a started ``Server`` (its router, tokenizer, limits and serving state)."""
    app = FastAPI(title="pop-disagg", docs_url=None, redoc_url=None, openapi_url=None)
    dep, limits = server.deployment, server.limits
    model_name = server.served_model_name

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request, exc):
        return _validation_error(exc)

    @app.exception_handler(HTTPException)
    async def _on_http(request, exc):
        kind = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        return _error(
            exc.status_code, str(exc.detail), kind, code="request_too_large" if exc.status_code == 413 else None
        )

    @app.exception_handler(InvalidRequest)
    @app.exception_handler(OpenAIError)
    async def _on_refusal(request, exc):  # routes that raise rather than answer (tokenize_api.py)
        status, body = error_of(exc)
        return JSONResponse(body, status_code=status)

    def check_model(name: str) -> None:
        if name != model_name:
            raise OpenAIError(
                404,
                f"The model {name!r} does not exist; this server serves {model_name!r}",
                param="model",
                code="model_not_found",
            )

    tokenize_api.add_routes(app, dep.tokenizer, limits, check_model)
    check_grammar = structured_output.EdgeCheck(dep.tokenizer, dep.arch.vocab_size)

    async def generate(req: _SamplingRequest, request: Request):
        try:
            check_model(req.model)
            media = server.media
            parse = functools.partial(parse_calls, req, dep.tokenizer, limits, check_grammar, media)
            if isinstance(req, ChatCompletionRequest) and any(m.image_urls for m in req.messages):
                # Fetching, decoding and resizing images is blocking work: off the event loop.
                parsed = await asyncio.to_thread(parse)
            else:
                parsed = parse()
            calls = [c for call, _ in parsed for c in fanout.sample_calls(call, req.n)]
            texts = [text for _, text in parsed for _ in range(req.n)]
            render = _Render(req, model_name, dep.tokenizer, calls, texts)
            if not req.stream:
                results = await _unless_disconnected(fanout.generate_all(server.router, calls), request)
                return JSONResponse(render.body(results))
            streams = [server.router.stream(c) for c in calls]
            try:
                firsts = await _unless_disconnected(fanout.first_items(streams), request)
            except BaseException:
                for s in streams:
                    await s.aclose()
                raise
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return _ClosingStreamingResponse(
                _events(streams, firsts, render), media_type="text/event-stream", headers=headers
            )
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
        except Exception as exc:
            status, body = error_of(exc)
            if status >= 500 and not isinstance(exc, ServingError):
                log.exception("request failed")
            return JSONResponse(body, status_code=status)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await generate(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await generate(body, request)

    @app.get("/v1/models")
    async def models():
        info = await server.model_info()
        card = {
            "id": model_name,
            "object": "model",
            "created": int(server.started_at),
            "owned_by": "pop-disagg",
            "root": dep.config.engine.model,
            "max_model_len": limits.context_limit,
            "pop_disagg": info,
        }
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        if server.is_serving:
            return {"status": "serving"}
        return _error(503, "not serving (draining, or no live decode worker)", "service_unavailable")

    @app.get("/metrics")
    async def metrics():
        registry = getattr(getattr(server, "metrics", None), "registry", None)
        if registry is None:
            return _error(404, "this server has no metrics", "invalid_request_error")
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return _Guard(app, server)


class HttpFrontEnd:
    """uvicorn serving ``create_app(server)`` as a task on the running loop."""

    def __init__(self, server):
        self.server = server
        self._uvicorn = None
        self._task: asyncio.Task | None = None

    async def start(self, host: str, port: int, grace_s: float = 2.0) -> int:
        """Bind, start serving and return the port (useful with ``port=0``)."""
        import uvicorn

        class _Embedded(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # the process that owns the loop handles SIGINT/SIGTERM
                yield

        # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and without
        # it every response's body waits for the ACK of its headers (Nagle vs delayed ACK, ~40 ms).
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise RuntimeError(f"cannot bind the HTTP port {host}:{port}: {exc.strerror}") from None
        bound = sock.getsockname()[1]
        config = uvicorn.Config(
            create_app(self.server),
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=grace_s,
        )
        self._uvicorn = _Embedded(config)
        self._task = asyncio.create_task(self._uvicorn.serve(sockets=[sock]))
        while not self._uvicorn.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.01)
        return bound

    async def stop(self) -> None:
        if self._task is None:
            return
        self._uvicorn.should_exit = True
        try:
            await self._task
        finally:
            self._task = None
