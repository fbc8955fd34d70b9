"""What the front end alone costs per request: gRPC vs the OpenAI HTTP API over a router that does no work.

The model is taken out: both front ends (the real ``GenerationServicer`` and the real
``http_api`` app under uvicorn, on one event loop as in ``pop-disagg serve``) sit on a fake router
that answers every request at once with ``--num-chunks`` one-token deltas. The server runs in a
child process (an in-process client would fight it for the GIL); the client sends the same token-id
prompt ``--num-requests`` times per protocol, one at a time (streaming: ``GenerateStream`` /
``POST /v1/completions`` with ``stream`` and ``return_token_ids``), alternating protocols in
blocks. Per request it records the wall time to the first token chunk and to the end of the
stream; per block, the CPU time of the server process (``/proc/PID/stat``, 10 ms ticks) and of the
client (``time.process_time``), divided by the block: a loaded machine disturbs CPU time far less
than wall time.

    python benchmarks/frontend_overhead.py --num-requests 300 --num-chunks 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

import grpc  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402

from pop_disagg._proto import generation_pb2 as pb  # noqa: E402
from pop_disagg._proto import generation_pb2_grpc as pb_grpc  # noqa: E402
from pop_disagg.limits import ModelLimits  # noqa: E402
from pop_disagg.server.control.calls import Delta, GenerateResult  # noqa: E402
from pop_disagg.server.frontend.grpc_api import GenerationServicer  # noqa: E402
from pop_disagg.server.frontend.http_api import HttpFrontEnd  # noqa: E402


class InstantRouter:
    """The router's interface, answering ``num_chunks`` one-token deltas without any model."""

    def __init__(self, num_chunks: int):
        self.num_chunks = num_chunks

    async def stream(self, call):
        for i in range(self.num_chunks - 1):
            yield Delta("req", " tok", [7])
            await asyncio.sleep(0)  # a real router yields to the loop between decode events
        yield GenerateResult("req", " tok", [7], "length", len(call.prompt_token_ids), self.num_chunks)

    async def generate(self, call):
        async for item in self.stream(call):
            pass
        return item


def fake_server(num_chunks: int):
    arch = types.SimpleNamespace(vocab_size=1000, family="fake", num_layers=1, eos_token_ids=[2])
    config = types.SimpleNamespace(engine=types.SimpleNamespace(model="fake"), topology="fake", prefill="none")
    dep = types.SimpleNamespace(config=config, arch=arch, tokenizer=None, plan=None, prefill=[], decode=[])
    router = InstantRouter(num_chunks)

    async def model_info():
        return {"model": "fake"}

    limits = ModelLimits(arch.vocab_size, 4096)
    return (
        types.SimpleNamespace(
            deployment=dep,
            router=router,
            limits=limits,
            metrics=None,
            served_model_name="fake",
            is_serving=True,
            started_at=time.time(),
            model_info=model_info,
        ),
        dep,
        router,
    )


def serve_forever(num_chunks: int, conn) -> None:
    """The child: both front ends on one loop over the instant router; sends its ports, runs until killed."""
    server, dep, router = fake_server(num_chunks)

    async def run():
        g = grpc.aio.server()
        pb_grpc.add_GenerationServicer_to_server(GenerationServicer(server), g)
        port = g.add_insecure_port("127.0.0.1:0")
        await g.start()
        http_port = await HttpFrontEnd(server).start("127.0.0.1", 0)
        conn.send((port, http_port))
        await asyncio.Event().wait()

    asyncio.run(run())


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-requests", type=int, default=300, help="per protocol")
    p.add_argument("--num-chunks", type=int, default=16, help="one-token chunks per response")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--block", type=int, default=25, help="requests per protocol before switching")
    p.add_argument("--nagle", action="store_true", help="leave the HTTP client's socket as httpx opens it (Nagle on)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "frontend" / "overhead.json"))
    args = p.parse_args()

    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("spawn").Process(
        target=serve_forever, args=(args.num_chunks, child), daemon=True
    )
    proc.start()
    try:
        port, http_port = parent.recv()
        samples = measure(args, port, http_port, proc.pid)
    finally:
        proc.kill()
        proc.join(10)

    summary = {
        name: {
            k: {"median": statistics.median(v), "p99": float(np.percentile(v, 99)), "mean": statistics.fmean(v)}
            for k, v in s.items()
        }
        for name, s in samples.items()
    }
    result = {"settings": vars(args), "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(
        "| protocol | first chunk p50 (ms) | first chunk p99 (ms) | whole stream p50 (ms) | whole stream p99 (ms) | server CPU per request (ms) | client CPU per request (ms) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        print(
            f"| {name} | {s['ttft_ms']['median']:.2f} | {s['ttft_ms']['p99']:.2f} | {s['e2e_ms']['median']:.2f} | {s['e2e_ms']['p99']:.2f} | {s['server_cpu_ms']['mean']:.2f} | {s['client_cpu_ms']['mean']:.2f} |"
        )
    print(f"wrote {args.out}")
    return 0


def measure(args, port: int, http_port: int, pid: int) -> dict:
    prompt = list(range(10, 10 + args.prompt_len))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.GenerationStub(channel)
    # Without TCP_NODELAY the client's request body waits for the ACK of its headers (Nagle vs
    # delayed ACK: ~40 ms on Linux), which measures the client's socket, not the server.
    transport = httpx.HTTPTransport(socket_options=[] if args.nagle else [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    client = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30, transport=transport)
    body = {
        "model": "fake",
        "prompt": prompt,
        "max_tokens": args.num_chunks,
        "temperature": 0,
        "stream": True,
        "return_token_ids": True,
    }

    def grpc_once():
        first = None
        for chunk in stub.GenerateStream(
            pb.GenerateRequest(prompt_token_ids=prompt, max_new_tokens=args.num_chunks), timeout=30
        ):
            if first is None and chunk.token_ids:
                first = time.perf_counter()
        return first

    def http_once():
        first = None
        with client.stream("POST", "/v1/completions", json=body) as resp:
            for line in resp.iter_lines():
                if first is None and line.startswith("data: {") and '"token_ids":[7' in line:
                    first = time.perf_counter()
        return first

    sends = {"grpc": grpc_once, "openai": http_once}
    samples = {k: {"ttft_ms": [], "e2e_ms": [], "server_cpu_ms": [], "client_cpu_ms": []} for k in sends}
    for once in sends.values():  # warm-up: connections, first-call paths
        for _ in range(10):
            once()
    done = 0
    while done < args.num_requests:
        n = min(args.block, args.num_requests - done)
        for name, once in sends.items():
            c0, k0 = cpu_s(pid), time.process_time()
            for _ in range(n):
                t0 = time.perf_counter()
                first = once()
                t1 = time.perf_counter()
                samples[name]["ttft_ms"].append((first - t0) * 1e3)
                samples[name]["e2e_ms"].append((t1 - t0) * 1e3)
            samples[name]["server_cpu_ms"].append((cpu_s(pid) - c0) / n * 1e3)
            samples[name]["client_cpu_ms"].append((time.process_time() - k0) / n * 1e3)
        done += n
    client.close()
    channel.close()
    return samples


if __name__ == "__main__":
    sys.exit(main())
