"""The open-loop client: drives a running pop-disagg server and records every request.

The protocol is a backend (``backends.py``: gRPC by default, or the OpenAI HTTP API); everything
below (schedule, warm-up, concurrency cap, failures) is the same for all of them.

Life of a run: ``check_server`` asks ``Health`` (waiting up to ``connect_timeout_s`` for the
channel; an unreachable or unhealthy server raises ``ServerUnreachable``) and ``GetModelInfo``;
the warm-up requests go out together and are not recorded (if all of them fail, the server is
broken and the run stops); then requests are sent on the arrival schedule (``arrivals``) whether
or not earlier ones have finished (open loop), each as one ``GenerateStream`` call. With
``max_concurrency`` a request whose time has come waits for a free slot, and its latencies start
when it is actually sent, as in vLLM (its planned and actual send times are both recorded).
Sending stops after ``num_requests`` or once the schedule passes ``duration_s``; requests in
flight are then awaited. A failure (gRPC error, timeout, a stream the server aborted or ended
without a finish reason) stays in the records with its reason. Ctrl-C cancels what is in flight,
marks it ``cancelled`` and returns what was gathered.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .arrivals import check_arrival_settings, iter_gaps
from .metrics import RequestRecord
from .workloads import BenchRequest

# Large prompts as token ids exceed gRPC's 4 MiB default only for absurd lengths; lift it anyway.
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def _channel(target: str, tls_ca: str | None):
    import grpc

    from ..server.frontend.auth import channel_credentials

    creds = channel_credentials(tls_ca)
    if creds is None:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(target, creds, options=CHANNEL_OPTIONS)


class ServerUnreachable(RuntimeError):
    """No healthy server answers at the target."""


class RunSettings(BaseModel):
    """How one run sends its requests."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    request_rate: float = Field(float("inf"), description="requests per second; inf sends all at once")
    burstiness: float = Field(1.0, description="gamma shape of the gaps; 1 = Poisson")
    max_concurrency: int | None = Field(None, ge=1, description="requests in flight at most")
    num_requests: int | None = Field(None, ge=1)
    duration_s: float | None = Field(None, gt=0, description="stop sending once the schedule passes this")
    num_warmup: int = Field(1, ge=0)
    seed: int = 0
    ignore_eos: bool = False
    temperature: float = Field(0.0, ge=0)
    request_timeout_s: float | None = Field(None, gt=0)
    prune_ratio: float | None = Field(None, description="ask every request for this plan of the served family")

    @model_validator(mode="after")
    def _check(self) -> "RunSettings":
        check_arrival_settings(self.request_rate, self.burstiness)
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("set num_requests, duration_s or both")
        return self


@dataclass
class RunResult:
    records: list[RequestRecord]
    duration_s: float  # first send to last completion
    started_at: float  # wall clock (time.time()) at the first send
    is_interrupted: bool = False


def make_message(req: BenchRequest, settings: RunSettings, index: int):
    from .._proto import generation_pb2 as pb

    msg = pb.GenerateRequest(max_new_tokens=req.max_new_tokens, temperature=settings.temperature, ignore_eos=settings.ignore_eos)
    if settings.temperature > 0:
        msg.seed = settings.seed * 1_000_003 + index  # reproducible sampling, distinct per request
    if settings.prune_ratio is not None:
        msg.prune_ratio = settings.prune_ratio
    if req.prompt_token_ids is not None:
        msg.prompt_token_ids.extend(req.prompt_token_ids)
    else:
        msg.prompt = req.prompt
    return msg


async def check_server(target: str, connect_timeout_s: float = 10.0, auth_token: str | None = None, tls_ca: str | None = None) -> tuple[dict, dict]:
    """(health, model info) as dicts; raises ``ServerUnreachable`` with one readable line.
    ``auth_token``: sent as ``authorization: Bearer``; ``tls_ca``: PEM CA file, connect over TLS."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    from .._proto import generation_pb2 as pb
    from .._proto.generation_pb2_grpc import GenerationStub
    from ..server.frontend.auth import bearer_metadata

    md = bearer_metadata(auth_token)
    async with _channel(target, tls_ca) as channel:
        stub = GenerationStub(channel)
        try:
            health = await stub.Health(pb.HealthRequest(), timeout=connect_timeout_s, wait_for_ready=True, metadata=md)
            info = await stub.GetModelInfo(pb.ModelInfoRequest(), timeout=connect_timeout_s, metadata=md)
        except grpc.aio.AioRpcError as exc:
            why = "no answer" if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else f"{exc.code().name}: {exc.details()}"
            raise ServerUnreachable(f"cannot reach a pop-disagg server at {target} within {connect_timeout_s:g}s ({why})") from None
    as_dict = lambda m: MessageToDict(m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)  # noqa: E731
    if not health.is_serving:
        raise ServerUnreachable(f"the server at {target} is not serving: {health.message or 'no reason given'}")
    return as_dict(health), as_dict(info)


async def _send(stub, msg, rec: RequestRecord, timeout_s: float | None, metadata=None) -> None:
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
                rec.usage_prompt_tokens, rec.usage_completion_tokens = chunk.usage.prompt_tokens, chunk.usage.completion_tokens
                t = chunk.timings
                rec.server_timings = dict(queue_s=t.queue_s, prefill_s=t.prefill_s, transfer_s=t.transfer_s, ttft_s=t.ttft_s, decode_s=t.decode_s,
                                          prune_ratio=t.prune_ratio if t.HasField("prune_ratio") else None, num_skipped_layers=t.num_skipped_layers)
        rec.end_s = time.perf_counter() - t0
        if rec.finish_reason is None:
            rec.error = "incomplete: the stream ended without a finish reason"
        elif rec.finish_reason == "abort":
            rec.error = "aborted: the server cancelled the request"
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        rec.error = f"timeout: no answer within {timeout_s:g}s" if code == grpc.StatusCode.DEADLINE_EXCEEDED else f"{code.name}: {exc.details()}"
    except asyncio.CancelledError:
        rec.error = "cancelled: the benchmark was interrupted"
        call.cancel()
        raise


async def run_requests(target: str, settings: RunSettings, requests: list[BenchRequest], warmup: list[BenchRequest] = (),
                       show_progress: bool = True, desc: str = "", backend=None) -> RunResult:
    """Warm up, then send ``requests`` (cycled when the run is bounded by duration) on the schedule.

    ``backend`` (``backends.py``) is the protocol; default: gRPC to ``target``."""
    from tqdm.auto import tqdm

    from .backends import GrpcBackend

    if not requests:
        raise ValueError("no requests to send")
    backend = backend or GrpcBackend(target)
    async with backend.connect() as send:
        slots = asyncio.Semaphore(settings.max_concurrency) if settings.max_concurrency else None

        async def one(rec: RequestRecord, req: BenchRequest, start: float, bar=None) -> None:
            async with slots or contextlib.nullcontext():
                rec.send_s = time.perf_counter() - start
                try:
                    await send(req, settings, rec)
                finally:
                    if bar is not None:
                        bar.update(1)

        if warmup:
            recs = [RequestRecord(-1 - i, r.num_prompt_tokens, r.max_new_tokens) for i, r in enumerate(warmup)]
            await asyncio.gather(*(one(rec, r, time.perf_counter()) for rec, r in zip(recs, warmup)))
            if not any(rec.is_success for rec in recs):
                raise ServerUnreachable(f"every warm-up request to {target} failed; first: {recs[0].error}")

        gaps = iter_gaps(settings.request_rate, settings.burstiness, np.random.default_rng(settings.seed))
        records: list[RequestRecord] = []
        tasks: list[asyncio.Task] = []
        bar = tqdm(total=settings.num_requests, desc=desc or "requests", unit="req", disable=not show_progress, leave=False)
        start, started_at = time.perf_counter(), time.time()
        planned, is_interrupted = 0.0, False
        try:
            for i, req in enumerate(itertools.cycle(requests)):
                if settings.num_requests is not None and i >= settings.num_requests:
                    break
                planned += next(gaps) if i > 0 else 0.0
                if settings.duration_s is not None and planned >= settings.duration_s:
                    break
                delay = start + planned - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                rec = RequestRecord(i, req.num_prompt_tokens, req.max_new_tokens, scheduled_s=planned)
                records.append(rec)
                tasks.append(asyncio.create_task(one(rec, req, start, bar)))
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:  # Ctrl-C: keep what was measured, mark the rest
            is_interrupted = True
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for rec in records:
                if rec.end_s is None and rec.error is None:
                    rec.error = "cancelled: the benchmark was interrupted"
        finally:
            bar.close()
        return RunResult(records, time.perf_counter() - start, started_at, is_interrupted)
