"""The gRPC servicer (thin: parse, call the router, convert) and the server's life cycle.

Status codes: a request the server will not run -> ``INVALID_ARGUMENT`` naming the field; a dead
worker, broken link or timed-out transfer -> ``UNAVAILABLE``; anything unexpected -> ``INTERNAL``.
A client that cancels or disconnects cancels the handler's task, which the router turns into
aborts on both workers.
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
from .depth import DepthController, kv_share, plan_costs
from .errors import ServingError
from .router import Router

log = logging.getLogger("pop_disagg.serve")


def _status_of(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, ServingError):
        return getattr(grpc.StatusCode, exc.grpc_code)
    return grpc.StatusCode.INTERNAL


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, deployment: Deployment, router: Router):
        self.dep, self.router = deployment, router
        engine = deployment.config.worker_engine
        self.limits = protocol.ModelLimits(deployment.arch.vocab_size, engine.context_limit(deployment.arch), deployment.family.ratios)

    async def _parse(self, request, context) -> protocol.GenerateCall:
        try:
            return protocol.parse_generate(request, self.dep.tokenizer, self.limits)
        except protocol.InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

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
        actors = self.dep.prefill + self.dep.decode
        try:
            await asyncio.wait_for(asyncio.gather(*[a.ping.remote() for a in actors]), timeout=5)
            ok, msg = True, "serving"
        except Exception as exc:
            ok, msg = False, f"a worker does not answer: {exc.__class__.__name__}"
        return pb.HealthResponse(is_serving=ok, message=msg, num_prefill_workers=len(self.dep.prefill), num_decode_workers=len(self.dep.decode))

    async def GetModelInfo(self, request, context):
        cfg, arch, plan = self.dep.config, self.dep.arch, self.dep.plan
        return pb.ModelInfoResponse(
            model=cfg.engine.model, family=arch.family, num_layers=arch.num_layers, vocab_size=arch.vocab_size,
            context_limit=self.limits.context_limit, topology=cfg.topology, prefill=cfg.prefill,
            skip_layers=list(plan.skip_layers), plan=plan.describe(), eos_token_ids=sorted(set(arch.eos_token_ids)),
            prune_ratios=list(self.dep.family.ratios), default_prune_ratio=self.dep.family.default_ratio,
            prefill_weight_bytes=self.dep.prefill_weight_bytes, adaptive_depth=cfg.adaptive_depth, ttft_slo_ms=cfg.ttft_slo_ms or 0.0,
        )


def make_depth_controller(dep: Deployment, registry=None) -> DepthController:
    """The router's depth controller for this deployment. ``registry``: where its counter goes
    (the server's metrics registry once there is one; default a fresh one)."""
    arch, cfg = dep.arch, dep.config
    costs = plan_costs(dep.family, kv_share(arch.hidden_size, arch.q_size, arch.kv_size, arch.intermediate_size))
    slo = cfg.ttft_slo_ms / 1e3 if cfg.ttft_slo_ms is not None else None
    return DepthController(dep.family, len(dep.prefill), costs, slo, cfg.adaptive_depth, registry)


class Server:
    """Workers + router + gRPC server in one object. ``start``/``stop`` run on an asyncio loop."""

    def __init__(self, config: ServeConfig, host: str = "127.0.0.1", port: int = 50051, stats_interval_s: float = 10.0):
        self.config, self.host, self.port = config, host, port
        self.stats_interval_s = stats_interval_s
        self.deployment: Deployment | None = None
        self._grpc: grpc.aio.Server | None = None
        self._stats_task: asyncio.Task | None = None

    async def start(self) -> int:
        self.deployment = await asyncio.to_thread(Deployment.start, self.config)
        dep = self.deployment
        self.router = router = Router(dep.prefill, dep.decode, dep.tokenizer, self.config.is_disaggregated, make_depth_controller(dep))
        self._grpc = grpc.aio.server()
        pb_grpc.add_GenerationServicer_to_server(GenerationServicer(dep, router), self._grpc)
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
