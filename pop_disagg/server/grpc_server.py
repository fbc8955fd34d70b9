"""The gRPC servicer (thin: parse, call the router, convert) and the server's life cycle.

Status codes: a request the server will not run -> ``INVALID_ARGUMENT`` naming the field; a dead
worker, broken link or timed-out transfer -> ``UNAVAILABLE``; the client's deadline passed ->
``DEADLINE_EXCEEDED`` (the deadline travels with the request to the router and the workers);
anything unexpected -> ``INTERNAL``. A client that cancels or disconnects cancels the handler's
task, which the router turns into aborts on both workers. ``Health`` reports the supervisor's
view of every worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time

import grpc

from .._proto import generation_pb2 as pb
from .._proto import generation_pb2_grpc as pb_grpc
from . import protocol
from .deploy import Deployment, ServeConfig
from .errors import ServingError
from .router import Router
from .supervisor import Supervisor, WorkerState

log = logging.getLogger("pop_disagg.serve")


def _status_of(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, ServingError):
        return getattr(grpc.StatusCode, exc.grpc_code)
    return grpc.StatusCode.INTERNAL


_WORKER_STATES = {WorkerState.SERVING: pb.WORKER_STATE_SERVING, WorkerState.RESTARTING: pb.WORKER_STATE_RESTARTING, WorkerState.DEAD: pb.WORKER_STATE_DEAD}


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, deployment: Deployment, router: Router, supervisor: Supervisor):
        self.dep, self.router, self.supervisor = deployment, router, supervisor
        engine = deployment.config.worker_engine
        self.limits = protocol.ModelLimits(deployment.arch.vocab_size, engine.context_limit(deployment.arch))

    async def _parse(self, request, context) -> protocol.GenerateCall:
        try:
            call = protocol.parse_generate(request, self.dep.tokenizer, self.limits)
        except protocol.InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        remaining = context.time_remaining()
        if remaining is not None:
            call = dataclasses.replace(call, deadline=time.time() + remaining)
        return call

    async def _fail(self, context, exc: Exception) -> None:
        if not isinstance(exc, (ValueError, ServingError)):
            log.exception("request failed")
        await context.abort(_status_of(exc), f"{exc.__class__.__name__}: {exc}" if _status_of(exc) == grpc.StatusCode.INTERNAL else str(exc))

    async def Generate(self, request, context):
        call = await self._parse(request, context)
        try:
            result = await self.router.generate(call)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            await self._fail(context, exc)
        return protocol.to_response(result)

    async def GenerateStream(self, request, context):
        call = await self._parse(request, context)
        try:
            async for item in self.router.stream(call):
                if isinstance(item, protocol.GenerateResult):
                    yield protocol.to_last_chunk(item)
                else:
                    yield protocol.to_stream_chunk(item.request_id, item.text, item.token_ids)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            await self._fail(context, exc)

    async def Health(self, request, context):
        sup = self.supervisor
        slots = sup.snapshot()
        down = [f"{s.name} {s.state.value}: {s.message}" for s in slots if not s.is_serving]
        msg = "serving" if not down else "; ".join(down)
        workers = [pb.WorkerHealth(role=s.role, index=s.index, state=_WORKER_STATES[s.state], num_restarts=s.num_restarts, message=s.message) for s in slots]
        return pb.HealthResponse(is_serving=sup.is_serving, message=msg, num_prefill_workers=len(sup.prefill), num_decode_workers=len(sup.decode), workers=workers)

    async def GetModelInfo(self, request, context):
        cfg, arch, plan = self.dep.config, self.dep.arch, self.dep.plan
        return pb.ModelInfoResponse(
            model=cfg.engine.model, family=arch.family, num_layers=arch.num_layers, vocab_size=arch.vocab_size,
            context_limit=self.limits.context_limit, topology=cfg.topology, prefill=cfg.prefill,
            skip_layers=list(plan.skip_layers), plan=plan.describe(), eos_token_ids=sorted(set(arch.eos_token_ids)),
        )


class Server:
    """Workers + router + gRPC server in one object. ``start``/``stop`` run on an asyncio loop."""

    def __init__(self, config: ServeConfig, host: str = "127.0.0.1", port: int = 50051, stats_interval_s: float = 10.0):
        self.config, self.host, self.port = config, host, port
        self.stats_interval_s = stats_interval_s
        self.deployment: Deployment | None = None
        self.supervisor: Supervisor | None = None
        self._grpc: grpc.aio.Server | None = None
        self._stats_task: asyncio.Task | None = None

    async def start(self) -> int:
        self.deployment = await asyncio.to_thread(Deployment.start, self.config)
        dep, cfg = self.deployment, self.config
        self.supervisor = Supervisor(dep, cfg.worker_timeout_s)
        await self.supervisor.start()
        self.router = router = Router(self.supervisor, dep.tokenizer, cfg.is_disaggregated, cfg.kv_failure_policy, cfg.worker_timeout_s)
        self._grpc = grpc.aio.server()
        pb_grpc.add_GenerationServicer_to_server(GenerationServicer(dep, router, self.supervisor), self._grpc)
        self.port = self._grpc.add_insecure_port(f"{self.host}:{self.port}")
        if self.port == 0:
            raise RuntimeError(f"cannot bind {self.host}:{self.port}")
        await self._grpc.start()
        log.info("pop-disagg ready on %s:%d (%s, %s)", self.host, self.port, self.config.label, dep.plan.describe())
        self._stats_task = asyncio.create_task(self._log_stats(router))
        return self.port

    async def _log_stats(self, router: Router) -> None:
        """Every ``stats_interval_s`` with traffic: throughputs, running requests, mean TTFT."""
        prev, prev_t = dataclasses.replace(router.stats), time.perf_counter()
        while True:
            await asyncio.sleep(self.stats_interval_s)
            cur, now = dataclasses.replace(router.stats), time.perf_counter()
            if cur != prev or router.num_running:
                dt = now - prev_t
                done = cur.num_finished - prev.num_finished
                ttft = (cur.ttft_s_sum - prev.ttft_s_sum) / done * 1e3 if done else float("nan")
                log.info(
                    "prompt throughput %.1f tok/s, generation throughput %.1f tok/s, running %d, finished %d, failed %d, mean TTFT %.0f ms",
                    (cur.num_prompt_tokens - prev.num_prompt_tokens) / dt, (cur.num_generated_tokens - prev.num_generated_tokens) / dt,
                    router.num_running, done, cur.num_failed - prev.num_failed, ttft,
                )
            prev, prev_t = cur, now

    async def wait(self) -> None:
        await self._grpc.wait_for_termination()

    async def stop(self, grace_s: float = 2.0) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
            self._stats_task = None
        if self._grpc is not None:
            await self._grpc.stop(grace_s)
            self._grpc = None
        if self.supervisor is not None:
            await self.supervisor.stop()
        if self.deployment is not None:
            await asyncio.to_thread(self.deployment.shutdown)
            self.deployment = None


class BackgroundServer:
    """A ``Server`` on its own event-loop thread (tests, benchmarks, ``pop-disagg demo``)."""

    def __init__(self, config: ServeConfig, host: str = "127.0.0.1", port: int = 0):
        self.server = Server(config, host, port)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-server", daemon=True)
        self._thread.start()
        try:
            self.port = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result()
        except BaseException:
            self.stop()
            raise
        self.address = f"{host}:{self.port}"

    @property
    def deployment(self) -> Deployment:
        return self.server.deployment

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
