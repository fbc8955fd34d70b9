"""Where a CUDA-graph decode step's time goes: GPU work of the graph vs host work around it.

``decode_speed.py`` gives the step time and its distance to the HBM limit; this splits that step.
For each batch size it generates with our engine (CUDA graphs on), then measures

* ``step ms``: wall time of one ``engine.step()`` (inputs, padding, replay, sampling, update);
* ``replay ms``: the captured graph of that bucket replayed back to back (CUDA events), i.e. the
  GPU's own time for the forward, with no host work between steps;
* ``host ms``: the difference, the part of a step the GPU sits idle (nothing overlaps it today);
* the kernels of one replay under ``torch.profiler``, grouped (GEMM, attention, the rest), and the
  HBM limit (weight + KV bytes over the measured read bandwidth) for the fraction each reaches.

Usage (GPU): python benchmarks/decode_step_split.py --models llama-3.1-8b,smollm2-135m --batch-sizes 1,32
On a CPU it runs the padded (uncaptured) path, to check the script, and reports no replay split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

import decode_speed  # noqa: E402
from decode_speed import BLOCK_SIZE, build, machine_rates, step_roofline  # noqa: E402

from pop_disagg.config import EngineConfig, PruneConfig  # noqa: E402
from pop_disagg.engine.engine import LLMEngine  # noqa: E402
from pop_disagg.engine.sampling import SamplingParams  # noqa: E402
from pop_disagg.models.loader import resolve_dtype  # noqa: E402


def kernel_group(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("gemm", "gemv", "cutlass", "nvjet", "cublas", "splitk")):
        return "gemm"
    if any(s in n for s in ("flash", "fmha", "attention", "sdpa", "softmax")):
        return "attention"
    if any(s in n for s in ("index", "gather", "scatter")):
        return "index/gather"
    return "other"


def sync():
    if decode_speed.DEVICE.type == "cuda":
        torch.cuda.synchronize()


def bench(model, batch: int, prompt_len: int, new: int) -> dict:
    dev = decode_speed.DEVICE
    per_seq = prompt_len + new
    kv_mb = batch * (per_seq + BLOCK_SIZE) * model.arch.kv_bytes_per_token(model.dtype.itemsize) / 2**20 + 1
    cfg = EngineConfig(
        model="benchmark",
        dtype=str(model.dtype).removeprefix("torch."),
        device=dev.type,
        block_size=BLOCK_SIZE,
        kv_cache_memory_mb=kv_mb,
        max_num_seqs=batch,
        max_num_batched_tokens=batch * per_seq,
        prune=PruneConfig(no_prune=True),
        enable_prefix_caching=False,  # the timed run repeats the warm-up's prompts
    )
    engine = LLMEngine(cfg, model=model, tokenizer=None)
    if dev.type != "cuda":  # the script's own check on a CPU: the padded path, nothing captured
        from pop_disagg.engine.compiled_decode import BucketedDecode

        engine.runner.bucketed = BucketedDecode(model, engine.runner.kv_cache, batch, "padded")
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.arch.vocab_size, (batch, prompt_len), generator=gen).tolist()
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    engine.generate(prompts, params)  # warm-up: captures every bucket this shape needs
    for p in prompts:
        engine.add_request(p, params)
    engine.step()  # the prefill
    sync()
    times = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()  # returns after .tolist() of the sampled ids: the GPU is done
        times.append(time.perf_counter() - t0)
    times.sort()
    step = times[len(times) // 2]
    row = {"batch_size": batch, "prompt_len": prompt_len, "new_tokens": new, "step_ms": step * 1e3}
    graphs = engine.runner.bucketed._graphs if engine.runner.bucketed else {}
    if dev.type == "cuda" and graphs:
        (b, s), (graph, _, _) = max(graphs.items(), key=lambda kv: kv[0][1])  # the longest-context bucket
        for _ in range(3):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        replay = start.elapsed_time(end) / 20
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                graph.replay()
            torch.cuda.synchronize()
        groups, kernels = defaultdict(float), defaultdict(float)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                us = e.device_time / 5  # per replay
                groups[kernel_group(e.name)] += us
                kernels[e.name[:90]] += us
        row.update(
            bucket=[b, s],
            replay_ms=replay,
            host_ms=step * 1e3 - replay,
            kernel_ms={k: v / 1e3 for k, v in groups.items()},
            top_kernels=sorted(((v / 1e3, k) for k, v in kernels.items()), reverse=True)[:8],
        )
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="llama-3.1-8b,smollm2-135m")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    decode_speed.DEVICE = torch.device(args.device)
    dtype = resolve_dtype(args.dtype)
    gpu = torch.cuda.get_device_name() if decode_speed.DEVICE.type == "cuda" else "none"
    print(
        f"device {args.device} ({gpu}), torch {torch.__version__}, {args.dtype}, prompt {args.prompt_len}, {args.new_tokens} new tokens"
    )
    print(
        "| model | batch | step ms | replay ms (GPU) | host ms | GEMM / attention / index / other kernel ms | HBM limit ms | step, replay % of limit |"
    )
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for name in args.models.split(","):
        model, _, _ = build(name, dtype)
        for b in [int(x) for x in args.batch_sizes.split(",")]:
            row = bench(model, b, args.prompt_len, args.new_tokens)
            rates = machine_rates("wall", model.arch, b, dtype)
            roof = step_roofline(model, b, args.prompt_len + args.new_tokens / 2, rates)
            row.update(model=name, limit_ms=roof["t_limit_s"] * 1e3, read_bw=rates["read_bw"])
            results.append(row)
            km = row.get("kernel_ms", {})
            kern = (
                " / ".join(f"{km.get(g, 0.0):.2f}" for g in ("gemm", "attention", "index/gather", "other"))
                if km
                else "-"
            )
            replay = f"{row['replay_ms']:.2f}" if "replay_ms" in row else "-"
            host = f"{row['host_ms']:.2f}" if "host_ms" in row else "-"
            pct = f"{100 * row['limit_ms'] / row['step_ms']:.0f}%, " + (
                f"{100 * row['limit_ms'] / row['replay_ms']:.0f}%" if "replay_ms" in row else "-"
            )
            print(
                f"| {name} | {b} | {row['step_ms']:.2f} | {replay} | {host} | {kern} | {row['limit_ms']:.2f} | {pct} |",
                flush=True,
            )
            for ms, k in row.get("top_kernels", []):
                print(f"    {ms:7.3f} ms  {k}")
        del model
        if decode_speed.DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
