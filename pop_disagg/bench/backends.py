"""The protocols the load harness speaks: one class per protocol, one schedule (``runner.run_requests``).

A backend knows how to check a server (``check`` -> health and model info as dicts, or
``ServerUnreachable``) and, inside ``connect()``, how to send one ``BenchRequest`` as a streaming
call and fill its ``RequestRecord`` (chunk times and token counts since the send, finish reason,
server-reported usage, or an error ``"<code>: <details>"``). The runner decides when to send.

* ``GrpcBackend``: ``GenerateStream`` over ``grpc.aio`` (the default; ``runner``'s own client).
* ``OpenAIBackend``: ``POST /v1/completions`` or ``/v1/chat/completions`` with ``stream: true`` and
  ``stream_options.include_usage``, read as Server-Sent Events. It asks for vLLM's
  ``return_token_ids`` extension so every chunk says how many tokens it carries (pop-disagg and
  vLLM answer it); a server that ignores it is counted one token per non-empty chunk, and the
  last chunk takes whatever the final ``usage.completion_tokens`` says is missing.
  The token-id prompts of the ``random`` workload go to ``/v1/completions`` as ids, exactly what
  the gRPC backend sends; for chat they are decoded to text (the server's count, from ``usage``,
  is the one recorded).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

from .grpc_client import check_server, make_message, open_channel, send_stream
from .metrics import RequestRecord
from .settings import RunSettings, ServerUnreachable
from .workloads import BenchRequest

BACKENDS = ("grpc", "openai", "openai-chat")


class GrpcBackend:
    name = "grpc"

    def __init__(self, target: str, auth_token: str | None = None, tls_ca: str | None = None):
        self.target, self.auth_token, self.tls_ca = target, auth_token, tls_ca

    async def check(self, connect_timeout_s: float = 10.0) -> tuple[dict, dict]:
        return await check_server(self.target, connect_timeout_s, self.auth_token, self.tls_ca)

    def prepare(self, info: dict, tokenizer_name: str | None = None) -> None:
        pass

    @contextlib.asynccontextmanager
    async def connect(self):
        from .._proto.generation_pb2_grpc import GenerationStub
        from ..server.frontend.auth import bearer_metadata

        md = bearer_metadata(self.auth_token)
        async with open_channel(self.target, self.tls_ca) as channel:
            stub = GenerationStub(channel)

            async def send(req: BenchRequest, settings: RunSettings, rec: RequestRecord) -> None:
                await send_stream(stub, make_message(req, settings, rec.index), rec, settings.request_timeout_s, md)

            yield send


class OpenAIBackend:
    """An OpenAI-compatible server (pop-disagg's ``--http-port``, vLLM, SGLang, ...)."""

    def __init__(self, base_url: str, chat: bool = False, model: str | None = None, api_key: str | None = None):
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.is_chat, self.model, self.api_key = chat, model, api_key
        self.name = "openai-chat" if chat else "openai"
        self.path = "/v1/chat/completions" if chat else "/v1/completions"
        self.target = self.base_url
        self._tokenizer = None

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def check(self, connect_timeout_s: float = 10.0) -> tuple[dict, dict]:
        """``GET /v1/models`` (retried until the timeout while nothing listens) and ``GET /health``."""
        import httpx

        deadline = time.monotonic() + connect_timeout_s
        async with httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers(), timeout=connect_timeout_s
        ) as client:
            while True:
                try:
                    models = await client.get("/v1/models")
                    health = await client.get("/health")
                    break
                except httpx.TransportError as exc:
                    if time.monotonic() >= deadline:
                        raise ServerUnreachable(
                            f"cannot reach an OpenAI-compatible server at {self.base_url} within {connect_timeout_s:g}s ({exc.__class__.__name__})"
                        ) from None
                    await asyncio.sleep(0.2)
        if models.status_code != 200:
            raise ServerUnreachable(
                f"{self.base_url}/v1/models answered {models.status_code}: {_error_message(models.text)}"
            )
        cards = models.json().get("data") or []
        if not cards:
            raise ServerUnreachable(f"{self.base_url}/v1/models lists no model")
        card = next((c for c in cards if c.get("id") == self.model), None) if self.model else cards[0]
        if card is None:
            raise ServerUnreachable(
                f"{self.base_url} does not serve {self.model!r} (it serves {', '.join(c.get('id', '?') for c in cards)})"
            )
        self.model = card["id"]
        if health.status_code == 503:
            raise ServerUnreachable(f"the server at {self.base_url} is not serving: {_error_message(health.text)}")
        # pop-disagg's model card carries GetModelInfo; any other server gives the context length at most.
        info = dict(
            card.get("pop_disagg")
            or {"model": card.get("root") or card["id"], "context_limit": card.get("max_model_len")}
        )
        info["served_model_name"] = card["id"]
        health_dict = {"is_serving": health.status_code in (200, 404), "message": f"GET /health: {health.status_code}"}
        return health_dict, info

    def prepare(self, info: dict, tokenizer_name: str | None = None) -> None:
        """Chat sends text: token-id prompts are decoded with the served model's tokenizer."""
        if self.is_chat:
            from .workloads import load_tokenizer

            self._tokenizer = load_tokenizer(tokenizer_name or info["model"])

    def body(self, req: BenchRequest, settings: RunSettings, index: int) -> dict:
        body = {
            "model": self.model,
            "max_tokens": req.max_new_tokens,
            "temperature": settings.temperature,
            "ignore_eos": settings.ignore_eos,
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
        }
        if settings.temperature > 0:
            body["seed"] = settings.seed * 1_000_003 + index  # as the gRPC backend seeds each request
        if self.is_chat:
            text = req.prompt if req.prompt is not None else self._tokenizer.decode(list(req.prompt_token_ids))
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = req.prompt if req.prompt is not None else list(req.prompt_token_ids)
        return body

    @contextlib.asynccontextmanager
    async def connect(self):
        import httpx

        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)  # open loop: no client-side queue
        # TCP_NODELAY: httpx writes headers and body separately, and with Nagle the body would wait
        # for the server's delayed ACK of the headers, which adds the client's socket to every TTFT.
        transport = httpx.AsyncHTTPTransport(
            limits=limits, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        )
        async with httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers(), transport=transport, timeout=None
        ) as client:

            async def send(req: BenchRequest, settings: RunSettings, rec: RequestRecord) -> None:
                await self.send(client, self.body(req, settings, rec.index), rec, settings.request_timeout_s)

            yield send

    async def send(self, client, body: dict, rec: RequestRecord, timeout_s: float | None) -> None:
        import httpx

        t0 = time.perf_counter()
        counted_ids = False
        try:
            async with asyncio.timeout(timeout_s):
                async with client.stream("POST", self.path, json=body) as resp:
                    if resp.status_code != 200:
                        rec.error = (
                            f"HTTP {resp.status_code}: {_error_message((await resp.aread()).decode(errors='replace'))}"
                        )
                        return
                    async for line in resp.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        now = time.perf_counter() - t0
                        chunk = json.loads(data)
                        if "error" in chunk:
                            rec.error = f"stream error: {chunk['error'].get('message')}"
                            return
                        rec.request_id = rec.request_id or chunk.get("id", "")
                        for choice in chunk.get("choices") or []:
                            text = choice.get("delta", {}).get("content") if self.is_chat else choice.get("text")
                            ids = choice.get("token_ids")
                            counted_ids = counted_ids or ids is not None
                            num = len(ids) if ids is not None else int(bool(text))
                            if num:
                                rec.chunk_times_s.append(now)
                                rec.chunk_num_tokens.append(num)
                            if choice.get("finish_reason"):
                                rec.finish_reason = choice["finish_reason"]
                        if chunk.get("usage"):
                            rec.usage_prompt_tokens = chunk["usage"].get("prompt_tokens")
                            rec.usage_completion_tokens = chunk["usage"].get("completion_tokens")
            rec.end_s = time.perf_counter() - t0
        except TimeoutError:
            rec.error = f"timeout: no answer within {timeout_s:g}s"
            return
        except httpx.HTTPError as exc:
            rec.error = f"{exc.__class__.__name__}: {exc}"
            return
        except asyncio.CancelledError:
            rec.error = "cancelled: the benchmark was interrupted"
            raise
        missing = (rec.usage_completion_tokens or 0) - rec.num_output_tokens
        if not counted_ids and missing > 0 and rec.chunk_num_tokens:
            rec.chunk_num_tokens[-1] += missing  # a server without token ids: usage is the count
        if rec.finish_reason is None:
            rec.error = "incomplete: the stream ended without a finish reason"
        elif rec.finish_reason == "abort":
            rec.error = "aborted: the server cancelled the request"


def _error_message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text[:200]


def make_backend(
    name: str, target: str, model: str | None = None, api_key: str | None = None, tls_ca: str | None = None
):
    """``api_key``: the bearer token (gRPC metadata or the HTTP Authorization header)."""
    if name == "grpc":
        return GrpcBackend(target.removeprefix("grpc://"), auth_token=api_key, tls_ca=tls_ca)
    if name in ("openai", "openai-chat"):
        url = target if "://" in target else f"http://{target}"
        return OpenAIBackend(url, chat=name == "openai-chat", model=model, api_key=api_key)
    raise ValueError(f"--backend {name!r}: expected one of {', '.join(BACKENDS)}")
