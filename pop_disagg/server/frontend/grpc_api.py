"""The gRPC front end: the ``Generation`` servicer (thin: parse, call the router, convert) and the
``grpc.aio`` server around it (auth interceptor, maximum message size, TLS, the standard
``grpc.health.v1`` service and server reflection).

Status codes: a request the server will not run -> ``INVALID_ARGUMENT`` naming the field; a dead
worker, broken link or timed-out transfer -> ``UNAVAILABLE``; the client's deadline passed ->
``DEADLINE_EXCEEDED`` (the deadline travels with the request to the router and the workers);
anything unexpected -> ``INTERNAL``. A client that cancels or disconnects cancels the handler's
task, which the router turns into aborts on both workers. ``Health`` reports the supervisor's view
of every worker; ``grpc.health.v1`` says SERVING / NOT_SERVING for ``""`` and
``pop_disagg.v1.Generation`` as the server sets it (``GrpcFrontEnd.set_health``).

Both front ends take the started ``Server`` (``server/app.py``) and read what they need from it:
its router, tokenizer, model limits, supervisor, metrics and admission.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..._proto import generation_pb2 as pb
from ..._proto import generation_pb2_grpc as pb_grpc
from ...limits import InvalidRequest
from ..control.calls import GenerateCall, GenerateResult
from ..errors import ServingError
from ..workers.supervisor import WorkerState
from . import protocol

log = logging.getLogger("pop_disagg.serve")

GENERATION_SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # pop_disagg.v1.Generation

MIN_MAX_REQUEST_BYTES = 4 << 20  # gRPC's own default
BYTES_PER_CONTEXT_TOKEN = 32  # an id is <= 5 bytes on the wire; 32 leaves room for text prompts


def _status_of(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, ServingError):
        return getattr(grpc.StatusCode, exc.grpc_code)
    return grpc.StatusCode.INTERNAL


_WORKER_STATES = {
    WorkerState.SERVING: pb.WORKER_STATE_SERVING,
    WorkerState.RESTARTING: pb.WORKER_STATE_RESTARTING,
    WorkerState.DEAD: pb.WORKER_STATE_DEAD,
}


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, server):
        self.server = server

    async def _parse(self, request, context) -> GenerateCall:
        server = self.server
        try:
            args = (request, server.deployment.tokenizer, server.limits, server.media)
            # Decoding and resizing images is blocking work: off the event loop.
            call = (
                await asyncio.to_thread(protocol.parse_generate, *args)
                if request.images
                else protocol.parse_generate(*args)
            )
        except InvalidRequest as exc:
            if server.metrics is not None:
                server.metrics.count_failure("INVALID_ARGUMENT")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        remaining = context.time_remaining()
        if remaining is not None:
            call = dataclasses.replace(call, deadline=time.time() + remaining)
        return call

    async def _fail(self, context, exc: Exception) -> None:
        if not isinstance(exc, (ValueError, ServingError)):
            log.exception("request failed")
        status = _status_of(exc)
        await context.abort(
            status, f"{exc.__class__.__name__}: {exc}" if status == grpc.StatusCode.INTERNAL else str(exc)
        )

    async def Generate(self, request, context):
        call = await self._parse(request, context)
        try:
            result = await self.server.router.generate(call)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            await self._fail(context, exc)
        return protocol.to_response(result)

    async def GenerateStream(self, request, context):
        call = await self._parse(request, context)
        try:
            async for item in self.server.router.stream(call):
                if isinstance(item, GenerateResult):
                    yield protocol.to_last_chunk(item)
                else:
                    yield protocol.to_stream_chunk(item.request_id, item.text, item.token_ids, item.logprobs)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            await self._fail(context, exc)

    async def Health(self, request, context):
        sup, admission = self.server.supervisor, self.server.admission
        counts = dict(
            num_prefill_workers=len(sup.prefill), num_decode_workers=len(sup.decode), placements=self._placements()
        )
        if admission is not None and admission.is_draining:  # load balancers stop sending here
            return pb.HealthResponse(is_serving=False, message="draining", **counts)
        slots = sup.snapshot()
        down = [f"{s.name} {s.state.value}: {s.message}" for s in slots if not s.is_serving]
        msg = "serving" if not down else "; ".join(down)
        workers = [
            pb.WorkerHealth(
                role=s.role,
                index=s.index,
                state=_WORKER_STATES[s.state],
                num_restarts=s.num_restarts,
                message=s.message,
            )
            for s in slots
        ]
        return pb.HealthResponse(is_serving=sup.is_serving, message=msg, workers=workers, **counts)

    def _placements(self) -> list:
        """Where each worker runs, as reported when the deployment started (rank order; a
        replacement runs in the bundle, so on the node, of the worker it replaced)."""
        return [
            pb.WorkerPlacement(
                role=w.role,
                index=w.index,
                node_id=w.node_id,
                node_ip=w.node_ip,
                device=w.device,
                gpu_ids=list(w.gpu_ids),
                owns_gpu=w.owns_gpu,
            )
            for w in self.server.deployment.locations
        ]

    async def GetModelInfo(self, request, context):
        dep = self.server.deployment
        cfg, arch, plan = dep.config, dep.arch, dep.plan
        return pb.ModelInfoResponse(
            model=cfg.engine.model,
            family=arch.family,
            num_layers=arch.num_layers,
            vocab_size=arch.vocab_size,
            context_limit=self.server.limits.context_limit,
            topology=cfg.topology,
            prefill=cfg.prefill,
            skip_layers=list(plan.skip_layers),
            plan=plan.describe(),
            eos_token_ids=sorted(set(arch.eos_token_ids)),
            placements=self._placements(),
            prune_ratios=list(dep.family.ratios),
            default_prune_ratio=dep.family.default_ratio,
            prefill_weight_bytes=dep.prefill_weight_bytes,
            adaptive_depth=cfg.adaptive_depth,
            ttft_slo_ms=cfg.ttft_slo_ms or 0.0,
            image_placeholder=self.server.media.spec.placeholder if self.server.media.spec else "",
            max_images_per_prompt=cfg.media.max_images_per_prompt if self.server.media.spec else 0,
        )


class GrpcFrontEnd:
    """The ``grpc.aio`` server carrying ``Generation``, ``grpc.health.v1`` and reflection."""

    def __init__(self, server, interceptors: list | None = None):
        self.servicer = GenerationServicer(server)
        # Refused by gRPC (RESOURCE_EXHAUSTED) before the message is parsed: nothing valid is this big.
        max_bytes = max(MIN_MAX_REQUEST_BYTES, BYTES_PER_CONTEXT_TOKEN * server.limits.context_limit)
        if server.media.spec is not None:  # room for the images a prompt may carry
            media = server.config.media
            max_bytes += media.max_images_per_prompt * media.max_image_bytes
        self.grpc = grpc.aio.server(
            interceptors=interceptors or [], options=[("grpc.max_receive_message_length", max_bytes)]
        )
        pb_grpc.add_GenerationServicer_to_server(self.servicer, self.grpc)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            [GENERATION_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], self.grpc
        )

    async def start(self, host: str, port: int, credentials=None) -> int:
        """Bind (TLS when ``credentials`` is given) and start; returns the bound port."""
        address = f"{host}:{port}"
        bound = (
            self.grpc.add_secure_port(address, credentials)
            if credentials is not None
            else self.grpc.add_insecure_port(address)
        )
        if bound == 0:
            raise RuntimeError(f"cannot bind {address}")
        await self.grpc.start()
        return bound

    async def set_health(self, is_serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if is_serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", GENERATION_SERVICE):
            await self.health.set(service, status)

    async def wait(self) -> None:
        await self.grpc.wait_for_termination()

    async def close_health(self) -> None:
        await self.health.enter_graceful_shutdown()  # probes see NOT_SERVING from here on

    async def stop(self, grace_s: float) -> None:
        await self.grpc.stop(grace_s)
