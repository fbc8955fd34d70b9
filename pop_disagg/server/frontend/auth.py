"""Bearer-token authentication and TLS credentials, for the server and its clients.

Server side: ``BearerAuthInterceptor`` checks the metadata ``authorization: Bearer TOKEN`` of every
RPC before its handler runs; a missing or wrong token ends the call with ``UNAUTHENTICATED``
without deserializing the request or touching a worker. The comparison is constant-time
(``hmac.compare_digest``), so response timing does not leak how much of a guess was right.
Client side: ``bearer_metadata`` (the per-call metadata) and ``channel_credentials`` (TLS trusting a
given CA file), used by ``pop-disagg client`` and ``pop-disagg bench serve``.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Callable

import grpc

TOKEN_ENV = "POP_DISAGG_AUTH_TOKEN"
HEADER = "authorization"


def token_from_env(value: str | None) -> str | None:
    """``--auth-token`` if given, else ``$POP_DISAGG_AUTH_TOKEN``; empty means none."""
    value = value if value is not None else os.environ.get(TOKEN_ENV)
    return value or None


def check_token(token: str) -> str:
    if not token or not all("!" <= c <= "~" for c in token):
        # gRPC metadata values are printable ASCII; a space would split "Bearer TOKEN".
        raise ValueError("auth token: must be non-empty printable ASCII without spaces")
    return token


def is_authorized(header: str | None, token: str) -> bool:
    """Whether an ``authorization`` header value carries ``token`` (constant time in the token)."""
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer ") :].encode(), token.encode())


def _deny_unary(message: str):
    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return deny


def _deny_stream(message: str):
    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # never reached: makes this an async generator, as a streaming handler must be

    return deny


# Open without a token, as vLLM leaves /health open: liveness probes (Kubernetes, grpc_health_probe,
# the images' HEALTHCHECK) carry no credentials, and neither answer costs model work or leaks prompts.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, on_denied: Callable[[], None] | None = None):
        self.token = check_token(token)
        self.on_denied = on_denied  # e.g. counts request_failure_total{code="UNAUTHENTICATED"}

    async def intercept_service(self, continuation, handler_call_details):
        header = dict(handler_call_details.invocation_metadata or ()).get(HEADER)
        if handler_call_details.method.startswith(OPEN_SERVICES) or is_authorized(header, self.token):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
            return None
        if self.on_denied is not None:
            self.on_denied()
        why = (
            "missing bearer token (metadata 'authorization: Bearer TOKEN')" if header is None else "wrong bearer token"
        )
        # No request_deserializer: the request bytes are never parsed.
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(_deny_stream(why))
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(_deny_unary(why))
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(_deny_stream(why))
        return grpc.unary_unary_rpc_method_handler(_deny_unary(why))


def server_credentials(cert_file: str, key_file: str) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(Path(key_file).read_bytes(), Path(cert_file).read_bytes())])


def channel_credentials(ca_file: str | None) -> grpc.ChannelCredentials | None:
    """TLS trusting ``ca_file`` (PEM); None for a plaintext channel."""
    return None if ca_file is None else grpc.ssl_channel_credentials(root_certificates=Path(ca_file).read_bytes())


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return None if not token else ((HEADER, f"Bearer {token}"),)
