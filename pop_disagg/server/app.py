"""The composition root: one ``Server`` builds the workers, the request plane and the front ends.

``Server.start`` brings up the ``Deployment`` (workers on Ray), the ``Supervisor`` (health probes,
replacement), admission control, metrics, the depth controller and the ``Router``, then the gRPC
front end (``frontend/grpc_api.py``) and, with ``http_port``, the OpenAI-compatible HTTP front end
(``frontend/http_api.py``) on the same loop and router. The request rules are built once here
(``limits``: ``ModelLimits`` of the served model) and applied by both front ends.

It also owns what makes the server operable (docs/serving.md, "Operating"): bearer-token auth
(``auth_token``), TLS, the serving state that ``grpc.health.v1`` and ``GET /health`` publish (a
serving decode worker, and prefill worker when disaggregated, and not draining), the periodic stats
line, KV-block gauges, and ``drain``: stop admitting, let the requests in flight finish within a
timeout, fail the rest with ``UNAVAILABLE``. ``BackgroundServer`` runs one on its own loop thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time

from .._proto import generation_pb2 as pb
from ..config import ServeConfig
from ..limits import ModelLimits
from .control.admission import Admission, KVLimits, default_max_queued_requests
from .control.depth import DepthController, kv_share, plan_costs
from .control.metrics import ServerMetrics
from .control.observer import ServerObserver
from .control.router import Router
from .frontend.auth import BearerAuthInterceptor, check_token, server_credentials
from .frontend.grpc_api import GrpcFrontEnd
from .frontend.multimodal import MediaEdge
from .workers.deploy import Deployment
from .workers.supervisor import Supervisor

log = logging.getLogger("pop_disagg.serve")


def make_depth_controller(dep: Deployment, registry=None) -> DepthController:
    """The router's depth controller for this deployment. ``registry``: where its counter goes
    (the server's metrics registry once there is one; default a fresh one)."""
    arch, cfg = dep.arch, dep.config
    costs = plan_costs(dep.family, kv_share(arch.hidden_size, arch.q_size, arch.kv_size, arch.intermediate_size))
    slo = cfg.ttft_slo_ms / 1e3 if cfg.ttft_slo_ms is not None else None
    return DepthController(dep.family, len(dep.prefill), costs, slo, cfg.adaptive_depth, registry, rule=cfg.depth_rule)


class Server:
    """Workers + router + gRPC server in one object. ``start``/``drain``/``stop`` run on an asyncio loop.

    ``metrics_port``: serve ``/metrics`` there (None: no endpoint; ``server.metrics`` exists anyway).
    ``max_queued_requests``: None sizes it from the KV budget (``admission.py``). ``auth_token``:
    require ``authorization: Bearer TOKEN`` on every RPC. ``tls_cert``/``tls_key``: PEM files, serve TLS.
    """

    def __init__(
        self,
        config: ServeConfig,
        host: str = "127.0.0.1",
        port: int = 50051,
        stats_interval_s: float = 10.0,
        *,
        metrics_port: int | None = None,
        max_queued_requests: int | None = None,
        auth_token: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        kv_poll_interval_s: float = 0.5,
        http_port: int | None = None,
        served_model_name: str | None = None,
        health_interval_s: float = 5.0,
    ):
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
        self.supervisor: Supervisor | None = None
        self._grpc: GrpcFrontEnd | None = None
        self.limits: ModelLimits | None = None
        self.media: MediaEdge | None = None  # the image rules (vision-language models), set at start
        self._tasks: list[asyncio.Task] = []
        # HTTP front end (off when http_port is None) and the standard health service's state.
        self.http_port, self.health_interval_s = http_port, health_interval_s
        self.served_model_name = served_model_name or config.engine.model
        self.started_at = time.time()
        self._http = None
        self._is_admitting = True  # set_serving(False) while draining
        self._has_workers = True  # the periodic check: a decode worker (and a prefill worker) answers
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> int:
        from ..models.loader import resolve_dtype
        from ..models.registry import resolve_model

        self.deployment = await asyncio.to_thread(Deployment.start, self.config)
        dep = self.deployment
        engine = self.config.worker_engine
        context_limit = engine.context_limit(dep.arch)
        self.limits = ModelLimits(
            dep.arch.vocab_size,
            context_limit,
            dep.family.ratios,
            can_score_prompt=all(p.boundary_handling and p.independent_kv for p in dep.family.plans),
        )
        self.media = await asyncio.to_thread(
            MediaEdge.of,
            self.config.media,
            resolve_model(self.config.engine.model),
            dep.tokenizer,
            engine.enable_chunked_prefill,
        )
        # Asked once: every decode worker has the same budget, the smallest cache decides what fits.
        num_blocks = [s["num_blocks"] for s in await asyncio.gather(*[a.stats.remote() for a in dep.decode])]
        max_queued = self.max_queued_requests or default_max_queued_requests(num_blocks, engine.max_num_seqs)
        self.admission = Admission(KVLimits(min(num_blocks), engine.block_size, context_limit), max_queued)
        self.metrics.kv_bytes_per_token = dep.arch.kv_bytes_per_token(resolve_dtype(engine.dtype).itemsize)
        cfg = self.config
        self.supervisor = Supervisor(dep, cfg.worker_timeout_s, on_restart=self.metrics.count_worker_restart)
        await self.supervisor.start()
        self.router = router = Router(
            self.supervisor,
            dep.tokenizer,
            cfg.is_disaggregated,
            cfg.kv_failure_policy,
            cfg.worker_timeout_s,
            observer=ServerObserver(self.admission, self.metrics),
            depth=make_depth_controller(dep, self.metrics.registry),
            block_size=cfg.engine.block_size,
            is_prefix_caching=cfg.engine.enable_prefix_caching,
        )
        interceptors = (
            [BearerAuthInterceptor(self.auth_token, lambda: self.metrics.count_failure("UNAUTHENTICATED"))]
            if self.auth_token
            else []
        )
        self._grpc = GrpcFrontEnd(self, interceptors)
        self._loop = asyncio.get_running_loop()
        await self._check_workers()
        self.port = await self._grpc.start(self.host, self.port, self._tls)
        if self.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.host, self.metrics_port)
        await self._poll_kv_blocks()
        log.info(
            "pop-disagg ready on %s:%d (%s, %s; %s, auth %s, max %d queued requests%s)",
            self.host,
            self.port,
            self.config.label,
            dep.plan.describe(),
            "TLS" if self.tls_cert else "plaintext",
            "on" if self.auth_token else "off",
            max_queued,
            f", metrics on http://{self.host}:{self.metrics_port}/metrics" if self.metrics_port is not None else "",
        )
        self._tasks = [
            asyncio.create_task(self._log_stats(router)),
            asyncio.create_task(self._poll_kv_loop()),
            asyncio.create_task(self._watch_workers()),
        ]
        if self.http_port is not None:
            from .frontend.http_api import HttpFrontEnd

            self._http = HttpFrontEnd(self)
            self.http_port = await self._http.start(self.host, self.http_port)
            log.info(
                "OpenAI-compatible HTTP API on http://%s:%d/v1 (model %r)",
                self.host,
                self.http_port,
                self.served_model_name,
            )
        return self.port

    # ---- serving state: grpc.health.v1 and GET /health --------------------------------------------
    @property
    def is_serving(self) -> bool:
        return self._is_admitting and self._has_workers

    def set_serving(self, is_serving: bool) -> None:
        """The drain hook: NOT_SERVING (and /health 503) while False. Callable from any thread."""
        self._is_admitting = is_serving
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._publish_health()))

    async def _publish_health(self) -> None:
        if self._grpc is not None:
            await self._grpc.set_health(self.is_serving)

    def _workers_up(self) -> bool:
        """SERVING needs a serving decode worker and, disaggregated, a serving prefill worker too
        (the supervisor's view, which its health probes keep current)."""
        sup = self.supervisor
        return any(s.is_serving for s in sup.decode) and (
            not self.config.is_disaggregated or any(s.is_serving for s in sup.prefill)
        )

    async def _check_workers(self) -> None:
        has_workers = self._workers_up()
        if has_workers != self._has_workers:
            log.warning(
                "workers %s: %s", "back" if has_workers else "lost", "SERVING" if has_workers else "NOT_SERVING"
            )
        self._has_workers = has_workers
        await self._publish_health()

    async def _watch_workers(self) -> None:
        # Woken by every supervisor state change (a worker lost, replaced or dead), so
        # grpc.health.v1 and /health flip as soon as the supervisor's probe sees it, not up to an
        # interval later (a load balancer would keep sending to a server with no decode worker);
        # the interval is only a backstop.
        while True:
            await self.supervisor.wait_for(lambda: self._workers_up() != self._has_workers, self.health_interval_s)
            await self._check_workers()

    async def model_info(self) -> dict:
        """``GetModelInfo`` as a dict (the HTTP API's model card carries it)."""
        from google.protobuf.json_format import MessageToDict

        msg = await self._grpc.servicer.GetModelInfo(pb.ModelInfoRequest(), None)
        return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)

    async def _poll_kv_blocks(self) -> None:
        for i, actor in enumerate(self.deployment.decode):
            try:
                s = await asyncio.wait_for(actor.stats.remote(), timeout=5)
            except Exception:  # a dead or restarting worker keeps its last value until it answers again
                continue
            self.metrics.set_kv_blocks(f"decode-{i}", s["num_free_blocks"], s["num_blocks"])
            self.metrics.set_engine_counters(f"decode-{i}", s)

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
                    (cur.num_prompt_tokens - prev.num_prompt_tokens) / dt,
                    (cur.num_generated_tokens - prev.num_generated_tokens) / dt,
                    router.num_running,
                    done,
                    cur.num_failed - prev.num_failed,
                    ttft,
                )
            prev, prev_t = cur, now

    async def wait(self) -> None:
        await self._grpc.wait()

    async def drain(self, timeout_s: float = 30.0) -> list[str]:
        """Admit nothing new (``UNAVAILABLE``), wait up to ``timeout_s`` for the requests in flight,
        then fail the rest with ``UNAVAILABLE`` (their blocks are freed). Returns the ids failed."""
        if self.admission is None:
            return []
        self.set_serving(False)  # probes and GET /health see NOT_SERVING from here on
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
            await self._grpc.close_health()
        if self._http is not None:
            await self._http.stop()
            self._http = None
        if self._grpc is not None:
            await self._grpc.stop(grace_s)
            self._grpc = None
        self.metrics.stop_serving()
        if self.supervisor is not None:
            await self.supervisor.stop()
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
        http_port = self.server.http_port
        self.http_url = None if http_port is None else f"http://{host}:{http_port}"

    @property
    def deployment(self) -> Deployment:
        return self.server.deployment

    def drain(self, timeout_s: float) -> list[str]:
        return asyncio.run_coroutine_threadsafe(self.server.drain(timeout_s), self.loop).result(timeout_s + 30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
