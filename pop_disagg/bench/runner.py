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

from .arrivals import iter_gaps
from .backends import GrpcBackend
from .grpc_client import check_server
from .metrics import RequestRecord
from .settings import RunSettings, ServerUnreachable
from .workloads import BenchRequest

__all__ = ["RunResult", "RunSettings", "ServerUnreachable", "check_server", "run_requests"]


@dataclass
class RunResult:
    records: list[RequestRecord]
    duration_s: float  # first send to last completion
    started_at: float  # wall clock (time.time()) at the first send
    is_interrupted: bool = False


async def run_requests(
    target: str,
    settings: RunSettings,
    requests: list[BenchRequest],
    warmup: list[BenchRequest] = (),
    show_progress: bool = True,
    desc: str = "",
    backend=None,
) -> RunResult:
    """Warm up, then send ``requests`` (cycled when the run is bounded by duration) on the schedule.

    ``backend`` (``backends.py``) is the protocol; default: gRPC to ``target``."""
    from tqdm.auto import tqdm

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
        bar = tqdm(
            total=settings.num_requests, desc=desc or "requests", unit="req", disable=not show_progress, leave=False
        )
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
