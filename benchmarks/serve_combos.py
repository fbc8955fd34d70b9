"""Time to first token and decode speed of the four serving combinations, in one run.

    python benchmarks/serve_combos.py [--model smollm2-135m-instruct] [--lengths 32,128,512]

For each of disaggregated/colocated x pop/full (1 prefill + 1 decode worker, or 1 colocated
worker) it starts the server on 127.0.0.1, sends one request at a time (``--reps`` per prompt
length, after one warm-up) through gRPC, and prints the median server-side TTFT, its parts
(queue / prefill / transfer) and decode tokens per second (generated tokens after the first,
over the decode time). Prompts are random token ids, so every combination sees the same input.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics

import grpc
import ray
import torch

from pop_disagg._proto import generation_pb2 as pb
from pop_disagg._proto import generation_pb2_grpc as pb_grpc
from pop_disagg.config import EngineConfig, ServeConfig
from pop_disagg.server.app import BackgroundServer

COMBOS = [("disaggregated", "pop"), ("disaggregated", "full"), ("colocated", "pop"), ("colocated", "full")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--lengths", default="32,128,512")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument(
        "--combos", default=",".join(f"{t}/{f}" for t, f in COMBOS), help="topology/prefill pairs, comma separated"
    )
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    g = torch.Generator().manual_seed(0)
    prompts = {n: torch.randint(100, 20000, (n,), generator=g).tolist() for n in lengths}
    rows = []
    try:
        for topology, prefill in [tuple(c.split("/")) for c in args.combos.split(",")]:
            # The repeats send one prompt: without this a colocated server would serve it from its
            # prefix cache and time no prefill.
            engine = EngineConfig(model=args.model, kv_cache_memory_mb=256, enable_prefix_caching=False)
            srv = BackgroundServer(
                ServeConfig(engine=engine, topology=topology, prefill=prefill, num_threads=args.threads)
            )
            try:
                with grpc.insecure_channel(srv.address) as channel:
                    stub = pb_grpc.GenerationStub(channel)
                    stub.Generate(
                        pb.GenerateRequest(prompt_token_ids=prompts[lengths[0]], max_new_tokens=4, ignore_eos=True)
                    )  # warm-up
                    for n in lengths:
                        runs = [
                            stub.Generate(
                                pb.GenerateRequest(
                                    prompt_token_ids=prompts[n], max_new_tokens=args.new_tokens, ignore_eos=True
                                )
                            )
                            for _ in range(args.reps)
                        ]
                        med = lambda f: statistics.median(f(r) for r in runs)  # noqa: E731
                        row = dict(
                            topology=topology,
                            prefill=prefill,
                            prompt_len=n,
                            ttft_ms=med(lambda r: r.timings.ttft_s) * 1e3,
                            queue_ms=med(lambda r: r.timings.queue_s) * 1e3,
                            prefill_ms=med(lambda r: r.timings.prefill_s) * 1e3,
                            transfer_ms=med(lambda r: r.timings.transfer_s) * 1e3,
                            decode_tok_s=med(lambda r: (r.usage.completion_tokens - 1) / r.timings.decode_s),
                        )
                        rows.append(row)
                        print(json.dumps(row), flush=True)
            finally:
                srv.stop()
    finally:
        ray.shutdown()
    print(
        f"\nmodel {args.model}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), torch threads per worker {args.threads}, {args.new_tokens} new tokens, median of {args.reps}"
    )
    print("| topology | prefill | prompt | TTFT ms | queue ms | prefill ms | transfer ms | decode tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['topology']} | {r['prefill']} | {r['prompt_len']} | {r['ttft_ms']:.0f} | {r['queue_ms']:.1f} | {r['prefill_ms']:.0f} | {r['transfer_ms']:.0f} | {r['decode_tok_s']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
