"""``pop-disagg serve``: start the workers (Ray actors) and the gRPC server; stop on SIGINT/SIGTERM.

Without ``--address`` it starts an embedded local Ray instance (laptop, CI); ``--address auto``
joins a running cluster (``ray up cluster/cluster.yaml``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from .common import add_model_args, add_prune_args, prune_config


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_prune_args(p)
    p.add_argument("--topology", default="disaggregated", choices=["disaggregated", "colocated"], help="separate prefill and decode workers, or one engine per worker")
    p.add_argument("--prefill", default="pop", choices=["pop", "full"], help="POP pruned prefill or every layer")
    p.add_argument("--num-prefill", type=int, default=1, help="prefill workers (disaggregated)")
    p.add_argument("--num-decode", type=int, default=1, help="decode workers (or engine workers when colocated)")
    p.add_argument("--kv-cache-mb", type=int, default=None, help="KV cache budget per decode worker (default 512 MiB on CPU, 85%% of free GPU memory)")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default the model's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: CPUs / workers, at least 1)")
    p.add_argument("--transfer-timeout", type=float, default=30.0, help="seconds before a stalled KV transfer fails its request")
    p.add_argument("--worker-timeout", type=float, default=30.0, help="seconds without a health answer before a worker is declared dead (its requests fail with UNAVAILABLE) and replaced")
    p.add_argument("--kv-failure-policy", default="recompute", choices=["recompute", "fail"], help="a request whose KV transfer failed is re-prefilled (recompute) or fails with UNAVAILABLE; a request whose prefill worker died is always re-prefilled")
    p.add_argument("--address", default=None, help="Ray cluster address ('auto' to join a running cluster); default: embedded local Ray")
    p.add_argument("--kv-correction", default=None, help="kv_correction.safetensors from `pop-disagg eval fidelity`: fitted K/V for the skipped layers (disaggregated + pop)")


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over gRPC with disaggregated (or colocated) prefill/decode workers")
    add_serve_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.set_defaults(func=run)


def serve_config(args: argparse.Namespace):
    import os

    from ..config import EngineConfig
    from ..server.deploy import ServeConfig

    num_workers = args.num_decode + (args.num_prefill if args.topology == "disaggregated" else 0)
    threads = args.threads or max(1, (os.cpu_count() or 1) // num_workers)
    engine = EngineConfig(model=args.model, dtype=args.dtype, device=args.device, prune=prune_config(args), kv_cache_memory_mb=args.kv_cache_mb, max_model_len=args.max_model_len)
    return ServeConfig(
        engine=engine, topology=args.topology, prefill=args.prefill, num_prefill=args.num_prefill, num_decode=args.num_decode, transfer_timeout_s=args.transfer_timeout,
        worker_timeout_s=args.worker_timeout, kv_failure_policy=args.kv_failure_policy, num_threads=threads, kv_correction=args.kv_correction,
    )


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

    from ..server.grpc_server import Server

    init_ray(args.address)
    try:
        asyncio.run(_serve(Server(config, args.host, args.port)))
    finally:
        ray.shutdown()
    return 0


async def _serve(server) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        await stop.wait()
        logging.getLogger("pop_disagg.serve").info("shutting down")
    finally:
        await server.stop()
