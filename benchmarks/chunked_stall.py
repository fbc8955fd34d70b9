"""How long running decodes stall behind a long prompt, chunked prefill off vs on.

One colocated engine (in process, no server, so no network or arrival noise): ``--streams``
requests are decoding when a ``--long-prompt``-token request arrives. Without chunking the next
engine step is that whole prompt's prefill, and every running stream waits for it; with
``--enable-chunked-prefill`` each step carries the running streams' tokens plus at most
``--max-num-batched-tokens`` prompt tokens. Printed per configuration: the running streams'
largest inter-token gap (the stall), their mean gap over the window in which the long prompt was
prefilled, and the long request's own TTFT; the same prompts and weights for every row, greedy,
one thread, the clock of ``--clock``. The streams' tokens are also compared across configurations
(chunking must not change them).

    python benchmarks/chunked_stall.py --threads 1 --clock cpu --long-prompt 1024 --budgets 0,64,256 \\
        --json benchmarks/results/chunked_prefill/stall_smollm2-135m-instruct_1024.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

import decode_speed  # noqa: E402
from decode_speed import clock  # noqa: E402  (the benchmarks' one clock: CPU or wall)

from pop_disagg.config import EngineConfig, PruneConfig  # noqa: E402
from pop_disagg.engine.engine import LLMEngine  # noqa: E402
from pop_disagg.engine.sampling import SamplingParams  # noqa: E402
from pop_disagg.models.loader import load_model, resolve_dtype  # noqa: E402
from pop_disagg.models.presets import PRESETS, build_random_model, preset_arch  # noqa: E402
from pop_disagg.models.registry import resolve_model  # noqa: E402


def run(model, budget: int, args, streams: list[list[int]], long_prompt: list[int]) -> dict:
    """budget 0 = chunked prefill off (whole prompts per prefill step)."""
    prune = PruneConfig(no_prune=True) if args.prefill == "full" else PruneConfig()
    tokens_held = sum(len(p) + args.stream_tokens for p in streams) + len(long_prompt) + 16 * (len(streams) + 2)
    kv_mb = max(256, tokens_held * model.arch.kv_bytes_per_token(model.dtype.itemsize) / 2**20 * 1.1)
    # On a GPU the decode-only steps run as CUDA graphs, as a server's do (mixed steps stay eager).
    config = EngineConfig(
        model="benchmark",
        dtype=str(model.dtype).removeprefix("torch."),
        device=model.device.type,
        kv_cache_memory_mb=kv_mb,
        max_num_seqs=len(streams) + 1,
        prune=prune,
        enable_chunked_prefill=budget > 0,
        max_num_batched_tokens=budget or max(8192, len(long_prompt)),
        enforce_eager=model.device.type != "cuda",
    )
    engine = LLMEngine(config, model=model, tokenizer=None)
    params = SamplingParams(max_new_tokens=args.stream_tokens, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in streams]
    stamps: dict[str, list[float]] = {i: [] for i in ids}
    tokens: dict[str, list[int]] = {}
    long_id, long_start, long_first = None, None, None
    step = 0
    while engine.has_unfinished():
        if step == args.arrive_after:  # the streams are decoding: the long prompt arrives now
            long_id = engine.add_request(long_prompt, SamplingParams(max_new_tokens=2, ignore_eos=True))
            long_start = clock(args.clock)
        if budget and args.profile_chunk_step and step == args.arrive_after + args.profile_chunk_step:
            outs = profiled_step(engine, args, budget)
        else:
            outs = engine.step()
        now = clock(args.clock)
        step += 1
        for o in outs:
            if o.request_id == long_id:
                long_first = long_first or now
                continue
            stamps[o.request_id].append(now)
            tokens[o.request_id] = o.token_ids
    gaps = [b - a for s in stamps.values() for a, b in zip(s, s[1:])]
    tpots = sorted((s[-1] - s[0]) / (len(s) - 1) for s in stamps.values())  # each stream's mean time per output token
    window = [b - a for s in stamps.values() for a, b in zip(s, s[1:]) if long_start <= b and a <= long_first]
    return {
        "budget": budget,
        "max_gap_ms": max(gaps) * 1e3,
        "window_mean_gap_ms": sum(window) / len(window) * 1e3 if window else None,
        "median_gap_ms": sorted(gaps)[len(gaps) // 2] * 1e3,
        "tpot_max_ms": tpots[-1] * 1e3,
        "long_ttft_ms": (long_first - long_start) * 1e3,
        "tokens": [tokens[i] for i in ids],
    }


def profiled_step(engine: LLMEngine, args, budget: int):
    """One engine step under ``torch.profiler`` (CPU, and CUDA on a GPU): its time and the ops that
    took it, printed and written to ``--profile-out``. Chunk steps on an H200 cost ~5x what their
    FLOPs and bytes should (benchmarks/results/gpu/README.md, "Chunked prefill"); this is the split
    a GPU run needs to find out why."""
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.config.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = clock(args.clock)
        outs = engine.step()
        elapsed = clock(args.clock) - t0
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30)
    head = (
        f"chunk step {args.profile_chunk_step} after the long prompt arrived (budget {budget} tokens/step, "
        f"{args.streams} decode rows): {elapsed * 1e3:.1f} ms on the {args.clock} clock under the profiler"
    )
    print(head + "\n" + table, flush=True)
    if args.profile_out:
        args.profile_out.parent.mkdir(parents=True, exist_ok=True)
        with args.profile_out.open("a") as f:
            f.write(head + "\n" + table + "\n")
    return outs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default="smollm2-135m-instruct", help="registry name, checkpoint folder or preset (random weights)"
    )
    p.add_argument("--device", default="cpu", help="cpu, or cuda (use --clock wall)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prefill", choices=["pop", "full"], default="pop")
    p.add_argument("--streams", type=int, default=4, help="requests decoding when the long prompt arrives")
    p.add_argument("--stream-prompt", type=int, default=32)
    p.add_argument("--stream-tokens", type=int, default=48)
    p.add_argument("--long-prompt", type=int, default=1024)
    p.add_argument("--arrive-after", type=int, default=6, help="engine steps before the long prompt arrives")
    p.add_argument("--budgets", default="0,64,256", help="max_num_batched_tokens per step; 0 = chunked prefill off")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--profile-chunk-step",
        type=int,
        default=0,
        help="with chunking on: profile the K-th step after the long prompt arrives (0: none)",
    )
    p.add_argument("--profile-out", type=Path, default=None, help="append the profile tables to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and args.clock == "cpu":
        p.error("--device cuda needs --clock wall (the CPU clock does not see GPU time)")
    if args.device == "cuda":
        decode_speed.DEVICE = torch.device("cuda")  # its clock waits for the GPU
    if args.model in PRESETS:
        model = build_random_model(preset_arch(args.model), resolve_dtype(args.dtype), args.device, seed=0)
    else:
        model = load_model(str(resolve_model(args.model)), args.dtype, args.device)
    g = torch.Generator().manual_seed(0)
    vocab = min(40000, model.arch.vocab_size)
    streams = [torch.randint(100, vocab, (args.stream_prompt,), generator=g).tolist() for _ in range(args.streams)]
    long_prompt = torch.randint(100, vocab, (args.long_prompt,), generator=g).tolist()
    rows = []
    for budget in [int(b) for b in args.budgets.split(",")]:
        rows.append(run(model, budget, args, streams, long_prompt))
        r = rows[-1]
        print(
            f"budget {budget or 'off'}: max gap {r['max_gap_ms']:.0f} ms, mean gap while the long prompt prefilled "
            f"{r['window_mean_gap_ms']:.0f} ms, median gap {r['median_gap_ms']:.0f} ms, long TTFT {r['long_ttft_ms']:.0f} ms",
            flush=True,
        )
    same = all(r["tokens"] == rows[0]["tokens"] for r in rows)
    gpu = f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    print(
        f"\nhardware: {os.cpu_count()} CPUs{gpu}, {args.dtype}, {args.threads} thread(s), clock {args.clock}, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.model}, prefill {args.prefill}, {args.streams} streams, "
        f"long prompt {args.long_prompt} tokens; streams' tokens identical across rows: {same}"
    )
    print(
        "| chunked prefill | max inter-token gap ms | mean gap during the long prefill ms | median gap ms | worst stream TPOT ms | long prompt TTFT ms |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        name = f"on, {r['budget']} tokens/step" if r["budget"] else "off"
        print(
            f"| {name} | {r['max_gap_ms']:.0f} | {r['window_mean_gap_ms']:.0f} | {r['median_gap_ms']:.0f} | {r['tpot_max_ms']:.1f} | {r['long_ttft_ms']:.0f} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "rows": [{k: v for k, v in r.items() if k != "tokens"} for r in rows],
                    "tokens_identical": same,
                },
                indent=2,
            )
        )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
