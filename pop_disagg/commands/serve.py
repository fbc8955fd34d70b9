"""``pop-disagg serve``: start the workers (Ray actors) and the gRPC server (and, with ``--http-port``,
the OpenAI-compatible HTTP API on the same loop); drain and stop on SIGINT/SIGTERM.

The first SIGTERM/SIGINT drains (new requests get ``UNAVAILABLE``, those in flight get up to
``--drain-timeout`` seconds, the rest fail cleanly), then every actor and process group is shut
down and the command exits 0; a second signal during the drain skips the wait.

Without ``--address`` it starts an embedded local Ray instance (laptop, CI); ``--address auto``
joins a running cluster (``ray up cluster/cluster.yaml``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from ..config import DEFAULT_MAX_LOCAL_PREFILL_TOKENS
from .common import add_batching_args, add_model_args, add_prune_args, prune_config


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_batching_args(p)
    add_prune_args(p)
    p.add_argument(
        "--topology",
        default="disaggregated",
        choices=["disaggregated", "colocated"],
        help="separate prefill and decode workers, or one engine per worker",
    )
    p.add_argument("--prefill", default="pop", choices=["pop", "full"], help="POP pruned prefill or every layer")
    p.add_argument("--num-prefill", type=int, default=1, help="prefill workers (disaggregated)")
    p.add_argument("--num-decode", type=int, default=1, help="decode workers (or engine workers when colocated)")
    p.add_argument(
        "--kv-cache-mb",
        type=int,
        default=None,
        help="KV cache budget per decode worker (default 512 MiB on CPU, 85%% of free GPU memory)",
    )
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default the model's)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads per worker (default: CPUs / workers, at least 1)"
    )
    p.add_argument(
        "--transfer-timeout", type=float, default=30.0, help="seconds before a stalled KV transfer fails its request"
    )
    p.add_argument(
        "--worker-timeout",
        type=float,
        default=30.0,
        help="seconds without a health answer before a worker is declared dead (its requests fail with UNAVAILABLE) and replaced",
    )
    p.add_argument(
        "--kv-failure-policy",
        default="recompute",
        choices=["recompute", "fail"],
        help="a request whose KV transfer failed is re-prefilled (recompute) or fails with UNAVAILABLE; a request whose prefill worker died is always re-prefilled",
    )
    p.add_argument(
        "--max-local-prefill-tokens",
        type=int,
        default=DEFAULT_MAX_LOCAL_PREFILL_TOKENS,
        help="disaggregated: when the decode worker's prefix cache holds part of a prompt's prefix and at most this many tokens are missing, it prefills them itself (same plan) and nothing is transferred; 0: only a prefix cached whole",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address ('auto' to join a running cluster); default: embedded local Ray",
    )
    p.add_argument(
        "--placement",
        default="pack",
        choices=["pack", "spread"],
        help="pack: prefill/decode pairs share a node (NVLink); spread: prefill and decode workers on different nodes",
    )
    p.add_argument(
        "--placement-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the workers' placement group before failing with what was asked and what the cluster has",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        default=None,
        help="CPUs reserved in each worker's bundle (default: 1 per GPU worker, a token share per CPU worker)",
    )
    p.add_argument(
        "--kv-correction",
        default=None,
        help="kv_correction.safetensors from `pop-disagg eval fidelity`: fitted K/V for the skipped layers (disaggregated + pop)",
    )
    from .plan import parse_ratios

    p.add_argument(
        "--prune-ratios",
        type=parse_ratios,
        default=None,
        help="serve a nested family of last-layer plans, e.g. 0.2,0.33,0.5 (first = default); requests pick one with prune_ratio. A family JSON goes to --prune-plan",
    )
    p.add_argument(
        "--adaptive-depth",
        action="store_true",
        help="requests without prune_ratio get the mildest plan predicted to meet --ttft-slo-ms",
    )
    p.add_argument("--ttft-slo-ms", type=float, default=None, help="TTFT target of --adaptive-depth (ms)")
    p.add_argument(
        "--limit-mm-per-prompt",
        default=None,
        help="vision-language models: images per prompt at most, vLLM's form image=N or '{\"image\": N}' (default 4)",
    )
    p.add_argument(
        "--allowed-media-domains",
        default=None,
        help="comma-separated hosts whose http(s) image URLs are fetched; default none (data: URLs only)",
    )
    p.add_argument(
        "--depth-rule",
        choices=["lookahead", "greedy"],
        default="lookahead",
        help="--adaptive-depth's rule: lookahead (also keep the requests expected behind within the SLO) or greedy (this request only)",
    )


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over gRPC with disaggregated (or colocated) prefill/decode workers")
    add_serve_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="also serve the OpenAI-compatible HTTP API on this port (same --host); off by default",
    )
    p.add_argument(
        "--served-model-name", default=None, help="the model name the HTTP API answers to (default: --model)"
    )
    add_operating_args(p)
    p.set_defaults(func=run)


def add_operating_args(p: argparse.ArgumentParser) -> None:
    """Limits, security, metrics and shutdown (docs/serving.md, "Operating")."""
    o = p.add_argument_group("operating")
    o.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off)",
    )
    o.add_argument(
        "--max-queued-requests",
        type=int,
        default=None,
        help="requests waiting for their first token at most; past it RESOURCE_EXHAUSTED (default: sum over decode workers of min(max_num_seqs, KV blocks))",
    )
    o.add_argument(
        "--auth-token",
        default=None,
        help="require 'authorization: Bearer TOKEN' on every RPC (default: $POP_DISAGG_AUTH_TOKEN; unset = no auth)",
    )
    o.add_argument("--tls-cert", default=None, help="PEM certificate (chain): serve TLS (with --tls-key)")
    o.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    o.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get to finish after SIGTERM"
    )


def serve_config(args: argparse.Namespace):
    import os

    from ..config import EngineConfig, PlacementConfig, ServeConfig

    num_workers = args.num_decode + (args.num_prefill if args.topology == "disaggregated" else 0)
    threads = args.threads or max(1, (os.cpu_count() or 1) // num_workers)
    from ..pop.plan import PlanFamily, read_plan_file

    prune, prune_family = prune_config(args), None
    if prune.plan_file is not None and isinstance(read_plan_file(prune.plan_file), PlanFamily):
        prune, prune_family = prune.model_copy(update={"plan_file": None}), prune.plan_file
    engine = EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        prune=prune,
        kv_cache_memory_mb=args.kv_cache_mb,
        max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager,
        compile_decode_on_cpu=args.compile_decode,
        cpu_blas=args.cpu_blas,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_chunked_prefill=args.enable_chunked_prefill,
        enable_prefix_caching=args.enable_prefix_caching,
    )
    depth = dict(
        prune_ratios=getattr(args, "prune_ratios", None),
        prune_family=prune_family,
        adaptive_depth=getattr(args, "adaptive_depth", False),
        ttft_slo_ms=getattr(args, "ttft_slo_ms", None),
        depth_rule=getattr(args, "depth_rule", "lookahead"),
    )
    return ServeConfig(
        engine=engine,
        topology=args.topology,
        prefill=args.prefill,
        num_prefill=args.num_prefill,
        num_decode=args.num_decode,
        transfer_timeout_s=args.transfer_timeout,
        worker_timeout_s=args.worker_timeout,
        kv_failure_policy=args.kv_failure_policy,
        max_local_prefill_tokens=args.max_local_prefill_tokens,
        num_threads=threads,
        kv_correction=args.kv_correction,
        placement=PlacementConfig(
            strategy=args.placement, timeout_s=args.placement_timeout, cpus_per_worker=args.cpus_per_worker
        ),
        media=media_config(args),
        **depth,
    )


def media_config(args: argparse.Namespace):
    """``--limit-mm-per-prompt`` / ``--allowed-media-domains`` -> ``MediaConfig``."""
    from ..config import MediaConfig
    from ..server.frontend.multimodal import parse_mm_limit

    fields = {}
    if getattr(args, "limit_mm_per_prompt", None) is not None:
        fields["max_images_per_prompt"] = parse_mm_limit(args.limit_mm_per_prompt)
    if getattr(args, "allowed_media_domains", None):
        fields["allowed_media_domains"] = tuple(d.strip() for d in args.allowed_media_domains.split(",") if d.strip())
    return MediaConfig(**fields)


def init_ray(address: str | None) -> None:
    import os

    import ray

    if address is None:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=True)
    else:
        ray.init(address=address, log_to_driver=True)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="[pop-disagg] %(message)s", stream=sys.stderr)
    config = serve_config(args)  # validate before starting anything
    import ray

    from ..server.app import Server
    from ..server.frontend.auth import token_from_env

    server = Server(
        config,
        args.host,
        args.port,
        metrics_port=args.metrics_port,
        max_queued_requests=args.max_queued_requests,
        auth_token=token_from_env(args.auth_token),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        http_port=args.http_port,
        served_model_name=args.served_model_name,
    )
    init_ray(args.address)
    try:
        asyncio.run(_serve(server, args.drain_timeout))
    finally:
        ray.shutdown()
    return 0


async def _serve(server, drain_timeout_s: float) -> None:
    stop = asyncio.Event()
    drain: asyncio.Task | None = None
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set() and drain is not None:
            drain.cancel()  # a second signal: stop now
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        await server.start()
        await stop.wait()
        drain = asyncio.create_task(server.drain(drain_timeout_s))
        try:
            await drain
        except asyncio.CancelledError:
            if not drain.cancelled():
                raise
        logging.getLogger("pop_disagg.serve").info("shutting down")
    finally:
        await server.stop()
