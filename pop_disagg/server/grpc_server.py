"""The gRPC servicer (thin: parse, call the router, convert) and the server's life cycle.

Status codes: a request the server will not run -> ``INVALID_ARGUMENT`` naming the field; a dead
worker, broken link or timed-out transfer -> ``UNAVAILABLE``; anything unexpected -> ``INTERNAL``.
A client that cancels or disconnects cancels the handler's task, which the router turns into
aborts on both workers.

``Server`` also owns what makes it operable (see docs/serving.md, "Operating"): admission control
(``admission.py``: queue bound, never-fits check, draining), Prometheus metrics (``metrics.py``,
``server.metrics.registry``), bearer-token auth (``auth.py``, ``server.auth_token``), TLS, a maximum
request size enforced by gRPC before a message is parsed, and ``drain``: stop admitting, let the
requests in flight finish within a timeout, fail the rest with ``UNAVAILABLE``.
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
from .admission import Admission, KVLimits, default_max_queued_requests
from .auth import BearerAuthInterceptor, check_token, server_credentials
from .deploy import Deployment, ServeConfig
from .errors import ServingError
from .metrics import ServerMetrics
from .observer import ServerObserver
from .router import Router

log = logging.getLogger("pop_disagg.serve")

MIN_MAX_REQUEST_BYTES = 4 << 20  # gRPC's own default
BYTES_PER_CONTEXT_TOKEN = 32  # an id is <= 5 bytes on the wire; 32 leaves room for text prompts


def _dtype_bytes(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def _status_of(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, ServingError):
        return getattr(grpc.StatusCode, exc.grpc_code)
    return grpc.StatusCode.INTERNAL


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, deployment: Deployment, router: Router, metrics: ServerMetrics | None = None, admission: Admission | None = None):
        self.dep, self.router = deployment, router
        self.metrics, self.admission = metrics, admission
        engine = deployment.config.worker_engine
        self.limits = protocol.ModelLimits(deployment.arch.vocab_size, engine.context_limit(deployment.arch))

    async def _parse(self, request, context) -> protocol.GenerateCall:
        try:
            return protocol.parse_generate(request, self.dep.tokenizer, self.limits)
        except protocol.InvalidRequest as exc:
            if self.metrics is not None:
                self.metrics.count_failure("INVALID_ARGUMENT")
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
        if self.admission is not None and self.admission.is_draining:  # load balancers stop sending here
            return pb.HealthResponse(is_serving=False, message="draining", num_prefill_workers=len(self.dep.prefill), num_decode_workers=len(self.dep.decode))
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
        )


class Server:
    """Workers + router + gRPC server in one object. ``start``/``drain``/``stop`` run on an asyncio loop.

    ``metrics_port``: serve ``/metrics`` there (None: no endpoint; ``server.metrics`` exists anyway).
    ``max_queued_requests``: None sizes it from the KV budget (``admission.py``). ``auth_token``:
    require ``authorization: Bearer TOKEN`` on every RPC. ``tls_cert``/``tls_key``: PEM files, serve TLS.
    """

    def __init__(self, config: ServeConfig, host: str = "127.0.0.1", port: int = 50051, stats_interval_s: float = 10.0, *,
                 metrics_port: int | None = None, max_queued_requests: int | None = None, auth_token: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, kv_poll_interval_s: float = 0.5):
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("--tls-cert and --tls-key: give both or neither")
        if max_queued_requests is not None and max_queued_requests < 1:
            raise ValueError(f"--max-queued-requests: must be >= 1, got {max_queued_requests}")
        self.config, self.host, self.port = config, host, port
        self.stats_interval_s = stats_interval_s
        self.metrics_port, self.max_queued_requests = metrics_port, max_queued_requests
        self.auth_token = check_token(auth_token) if auth_token else None
        self.tls_cert, self.tls_key = tls_cert, tls_key
        # Read now: a missing or bad file fails before any worker starts.
        self._tls = server_credentials(tls_cert, tls_key) if tls_cert is not None else None
        self.kv_poll_interval_s = kv_poll_interval_s
        self.metrics = ServerMetrics(config.is_disaggregated)
        self.admission: Admission | None = None
        self.deployment: Deployment | None = None
        self._grpc: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> int:
        self.deployment = await asyncio.to_thread(Deployment.start, self.config)
        dep = self.deployment
        engine = self.config.worker_engine
        context_limit = engine.context_limit(dep.arch)
        # Asked once: every decode worker has the same budget, the smallest cache decides what fits.
        num_blocks = [s["num_blocks"] for s in await asyncio.gather(*[a.stats.remote() for a in dep.decode])]
        max_queued = self.max_queued_requests or default_max_queued_requests(num_blocks, engine.max_num_seqs)
        self.admission = Admission(KVLimits(min(num_blocks), engine.block_size, context_limit), max_queued)
        self.metrics.kv_bytes_per_token = dep.arch.kv_bytes_per_token(_dtype_bytes(engine.dtype))
        self.router = router = Router(dep.prefill, dep.decode, dep.tokenizer, self.config.is_disaggregated, ServerObserver(self.admission, self.metrics))
        interceptors = [BearerAuthInterceptor(self.auth_token, lambda: self.metrics.count_failure("UNAUTHENTICATED"))] if self.auth_token else []
        # Refused by gRPC (RESOURCE_EXHAUSTED) before the message is parsed: nothing valid is this big.
        max_bytes = max(MIN_MAX_REQUEST_BYTES, BYTES_PER_CONTEXT_TOKEN * context_limit)
        self._grpc = grpc.aio.server(interceptors=interceptors, options=[("grpc.max_receive_message_length", max_bytes)])
        pb_grpc.add_GenerationServicer_to_server(GenerationServicer(dep, router, self.metrics, self.admission), self._grpc)
        address = f"{self.host}:{self.port}"
        if self._tls is not None:
            self.port = self._grpc.add_secure_port(address, self._tls)
        else:
            self.port = self._grpc.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"cannot bind {address}")
        await self._grpc.start()
        if self.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.host, self.metrics_port)
        await self._poll_kv_blocks()
        log.info(
            "pop-disagg ready on %s:%d (%s, %s; %s, auth %s, max %d queued requests%s)", self.host, self.port, self.config.label, dep.plan.describe(),
            "TLS" if self.tls_cert else "plaintext", "on" if self.auth_token else "off", max_queued,
            f", metrics on http://{self.host}:{self.metrics_port}/metrics" if self.metrics_port is not None else "",
        )
        self._tasks = [asyncio.create_task(self._log_stats(router)), asyncio.create_task(self._poll_kv_loop())]
        return self.port

    async def _poll_kv_blocks(self) -> None:
        for i, actor in enumerate(self.deployment.decode):
            try:
                s = await asyncio.wait_for(actor.stats.remote(), timeout=5)
            except Exception:  # a dead or restarting worker keeps its last value until it answers again
                continue
            self.metrics.set_kv_blocks(f"decode-{i}", s["num_free_blocks"], s["num_blocks"])

    async def _poll_kv_loop(self) -> None:
        while True:
            await asyncio.sleep(self.kv_poll_interval_s)
            await self._poll_kv_blocks()

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

    async def drain(self, timeout_s: float = 30.0) -> list[str]:
        """Admit nothing new (``UNAVAILABLE``), wait up to ``timeout_s`` for the requests in flight,
        then fail the rest with ``UNAVAILABLE`` (their blocks are freed). Returns the ids failed."""
        if self.admission is None:
            return []
        log.info("draining: %d requests in flight, waiting up to %gs", len(self.admission.in_flight), timeout_s)
        left = await self.admission.drain(timeout_s)
        if left:
            log.warning("drain timeout (%gs): failing %d requests still in flight", timeout_s, len(left))
            why = f"the server shut down before the request finished (drain timeout {timeout_s:g}s)"
            # Abort is idempotent on a worker that does not hold the request: ask every decode worker.
            for rid in left:
                for actor in self.deployment.decode:
                    actor.abort.remote(rid, why)
            await self.admission.drain(5.0)  # the streams end with the reason; stop() cancels stragglers
        return left

    async def stop(self, grace_s: float = 2.0) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        if self._grpc is not None:
            await self._grpc.stop(grace_s)
            self._grpc = None
        self.metrics.stop_serving()
        if self.deployment is not None:
            await asyncio.to_thread(self.deployment.shutdown)
            self.deployment = None


class BackgroundServer:
    """A ``Server`` on its own event-loop thread (tests, benchmarks, ``pop-disagg demo``); ``server_kwargs`` go to ``Server``."""

    def __init__(self, config: ServeConfig, host: str = "127.0.0.1", port: int = 0, **server_kwargs):
        self.server = Server(config, host, port, **server_kwargs)
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

    def drain(self, timeout_s: float) -> list[str]:
        return asyncio.run_coroutine_threadsafe(self.server.drain(timeout_s), self.loop).result(timeout_s + 30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
