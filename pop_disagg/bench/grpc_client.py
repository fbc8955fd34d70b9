"""The gRPC side of the load-testing client: channel, request message, server check, one streaming call.

Used by the runner (``check_server``) and by ``backends.GrpcBackend``; nothing here schedules.
"""

from __future__ import annotations

import asyncio
import time

from .metrics import RequestRecord
from .settings import RunSettings, ServerUnreachable
from .workloads import BenchRequest

# Large prompts as token ids exceed gRPC's 4 MiB default only for absurd lengths; lift it anyway.
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def open_channel(target: str, tls_ca: str | None):
    import grpc

    from ..server.frontend.auth import channel_credentials

    creds = channel_credentials(tls_ca)
    if creds is None:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(target, creds, options=CHANNEL_OPTIONS)


def make_message(req: BenchRequest, settings: RunSettings, index: int):
    from .._proto import generation_pb2 as pb

    msg = pb.GenerateRequest(
        max_new_tokens=req.max_new_tokens, temperature=settings.temperature, ignore_eos=settings.ignore_eos
    )
    if settings.temperature > 0:
        msg.seed = settings.seed * 1_000_003 + index  # reproducible sampling, distinct per request
    if settings.prune_ratio is not None:
        msg.prune_ratio = settings.prune_ratio
    if req.prompt_token_ids is not None:
        msg.prompt_token_ids.extend(req.prompt_token_ids)
    else:
        msg.prompt = req.prompt
    return msg


async def check_server(
    target: str, connect_timeout_s: float = 10.0, auth_token: str | None = None, tls_ca: str | None = None
) -> tuple[dict, dict]:
    """(health, model info) as dicts; raises ``ServerUnreachable`` with one readable line.
    ``auth_token``: sent as ``authorization: Bearer``; ``tls_ca``: PEM CA file, connect over TLS."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    from .._proto import generation_pb2 as pb
    from .._proto.generation_pb2_grpc import GenerationStub
    from ..server.frontend.auth import bearer_metadata

    md = bearer_metadata(auth_token)
    async with open_channel(target, tls_ca) as channel:
        stub = GenerationStub(channel)
        try:
            health = await stub.Health(pb.HealthRequest(), timeout=connect_timeout_s, wait_for_ready=True, metadata=md)
            info = await stub.GetModelInfo(pb.ModelInfoRequest(), timeout=connect_timeout_s, metadata=md)
        except grpc.aio.AioRpcError as exc:
            why = (
                "no answer"
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                else f"{exc.code().name}: {exc.details()}"
            )
            raise ServerUnreachable(
                f"cannot reach a pop-disagg server at {target} within {connect_timeout_s:g}s ({why})"
            ) from None
    as_dict = lambda m: MessageToDict(m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)  # noqa: E731
    if not health.is_serving:
        raise ServerUnreachable(f"the server at {target} is not serving: {health.message or 'no reason given'}")
    return as_dict(health), as_dict(info)


async def send_stream(stub, msg, rec: RequestRecord, timeout_s: float | None, metadata=None) -> None:
    """One streaming call; fills ``rec`` in place (times relative to the send)."""
    import grpc

    from .._proto import generation_pb2 as pb

    t0 = time.perf_counter()
    call = stub.GenerateStream(msg, timeout=timeout_s, metadata=metadata)
    try:
        async for chunk in call:
            now = time.perf_counter() - t0
            rec.request_id = rec.request_id or chunk.request_id
            if chunk.token_ids:
                rec.chunk_times_s.append(now)
                rec.chunk_num_tokens.append(len(chunk.token_ids))
            if chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                rec.finish_reason = pb.FinishReason.Name(chunk.finish_reason).removeprefix("FINISH_REASON_").lower()
                rec.usage_prompt_tokens, rec.usage_completion_tokens = (
                    chunk.usage.prompt_tokens,
                    chunk.usage.completion_tokens,
                )
                t = chunk.timings
                rec.server_timings = dict(
                    queue_s=t.queue_s,
                    prefill_s=t.prefill_s,
                    transfer_s=t.transfer_s,
                    ttft_s=t.ttft_s,
                    decode_s=t.decode_s,
                    prune_ratio=t.prune_ratio if t.HasField("prune_ratio") else None,
                    num_skipped_layers=t.num_skipped_layers,
                )
        rec.end_s = time.perf_counter() - t0
        if rec.finish_reason is None:
            rec.error = "incomplete: the stream ended without a finish reason"
        elif rec.finish_reason == "abort":
            rec.error = "aborted: the server cancelled the request"
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        rec.error = (
            f"timeout: no answer within {timeout_s:g}s"
            if code == grpc.StatusCode.DEADLINE_EXCEEDED
            else f"{code.name}: {exc.details()}"
        )
    except asyncio.CancelledError:
        rec.error = "cancelled: the benchmark was interrupted"
        call.cancel()
        raise
