"""Colocated TPOT under Poisson arrivals, chunked prefill off vs on, in one process.

``compare_configs.py`` measures this through a real server, and on a shared 2-core host the
background load moved TPOT p99 by more than chunking does
(benchmarks/results/chunked_prefill/README.md). Here one colocated engine (POP, eager) serves the
same requests under the same arrival times in its own clock: with ``--clock cpu`` (one thread)
time is the engine process's CPU time, so what other processes on the host do does not move the
schedule; a request "arrives" when the engine's clock passes its arrival time, and an idle engine
jumps to the next arrival. Each configuration replays identical prompts and arrivals (``--seed``);
the rows report what a client of the server would see (TTFT, TPOT, ITL percentiles of
``pop_disagg.bench``).
``--repeats`` runs the configurations again in reverse order.

    python benchmarks/colocated_arrivals.py --rate 0.25 --num-requests 40 --budgets 0,64,256 \\
        --json benchmarks/results/chunked_prefill/arrivals_0.25rps_2passes.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

import decode_speed  # noqa: E402
from decode_speed import clock  # noqa: E402
from prefill_speedup import hardware  # noqa: E402

from pop_disagg.bench.arrivals import arrival_gaps  # noqa: E402
from pop_disagg.bench.metrics import RequestRecord, summarize  # noqa: E402
from pop_disagg.bench.workloads import LengthSpec, random_requests  # noqa: E402
from pop_disagg.config import EngineConfig, PruneConfig  # noqa: E402
from pop_disagg.engine.engine import LLMEngine  # noqa: E402
from pop_disagg.engine.sampling import SamplingParams  # noqa: E402
from pop_disagg.models.loader import load_model  # noqa: E402
from pop_disagg.models.registry import resolve_model  # noqa: E402


def replay(model, budget: int, requests, arrivals: np.ndarray, args) -> tuple[list[RequestRecord], float]:
    """Serve ``requests`` arriving at ``arrivals`` (engine-clock seconds); budget 0 = chunking off."""
    longest = max(r.num_prompt_tokens + r.max_new_tokens for r in requests)
    config = EngineConfig(
        model="benchmark",
        kv_cache_memory_mb=args.kv_cache_mb,
        max_num_seqs=args.max_num_seqs,
        prune=PruneConfig(no_prune=True) if args.prefill == "full" else PruneConfig(),
        enable_chunked_prefill=budget > 0,
        max_num_batched_tokens=budget or max(8192, longest),
        enforce_eager=True,
        device=model.device.type,
    )
    engine = LLMEngine(config, model=model, tokenizer=None)
    records = [
        RequestRecord(
            index=i,
            num_prompt_tokens=r.num_prompt_tokens,
            max_new_tokens=r.max_new_tokens,
            scheduled_s=float(a),
            send_s=float(a),
        )
        for i, (r, a) in enumerate(zip(requests, arrivals))
    ]
    by_id: dict[str, RequestRecord] = {}
    skipped = 0.0  # idle time jumped over: the clock does not run while nothing is to be done
    start = clock(args.clock)
    now = lambda: clock(args.clock) - start + skipped  # noqa: E731
    nxt = 0
    while nxt < len(requests) or engine.has_unfinished():
        t = now()
        if not engine.has_unfinished() and nxt < len(requests) and arrivals[nxt] > t:
            skipped += arrivals[nxt] - t
            t = arrivals[nxt]
        while nxt < len(requests) and arrivals[nxt] <= t:
            r = requests[nxt]
            rid = engine.add_request(
                list(r.prompt_token_ids), SamplingParams(max_new_tokens=r.max_new_tokens, ignore_eos=True)
            )
            by_id[rid] = records[nxt]
            nxt += 1
        outs = engine.step()
        t = now()
        for o in outs:
            rec = by_id[o.request_id]
            rec.chunk_times_s.append(t - rec.send_s)
            rec.chunk_num_tokens.append(len(o.new_token_ids))
            if o.finished:
                rec.end_s, rec.finish_reason = t - rec.send_s, o.finish_reason
    return records, now()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prefill", choices=["pop", "full"], default="pop")
    p.add_argument("--rate", type=float, default=0.25, help="Poisson arrivals per second of the engine's clock")
    p.add_argument("--num-requests", type=int, default=40)
    p.add_argument("--input-len", default="lognormal:384:0.8")
    p.add_argument("--output-len", default="32")
    p.add_argument("--budgets", default="0,64,256", help="max_num_batched_tokens per step; 0 = chunked prefill off")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--kv-cache-mb", type=float, default=512)
    p.add_argument("--repeats", type=int, default=2, help="passes over the configurations, alternating their order")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.device == "cuda":
        if args.clock == "cpu":
            p.error("--device cuda needs --clock wall")
        decode_speed.DEVICE = torch.device("cuda")
    torch.set_num_threads(args.threads)
    model = load_model(str(resolve_model(args.model)), "float32" if args.device == "cpu" else "bfloat16", args.device)
    requests = random_requests(
        args.num_requests,
        LengthSpec.parse(args.input_len),
        LengthSpec.parse(args.output_len),
        model.arch.vocab_size,
        model.arch.max_position_embeddings,
        seed=args.seed,
    )
    arrivals = np.cumsum(arrival_gaps(args.num_requests, args.rate, seed=args.seed))
    budgets = [int(b) for b in args.budgets.split(",")]
    print(
        f"{args.model}, prefill {args.prefill}, {args.num_requests} requests at {args.rate}/s ({args.clock} clock), prompts "
        f"{args.input_len} ({sum(r.num_prompt_tokens for r in requests)} tokens), {args.output_len} out; {args.threads} thread(s), "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )
    print(
        "| pass | chunked prefill | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | ITL p99 ms | makespan s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    replay(model, budgets[-1], requests[:3], arrivals[:3] - arrivals[0], args)  # untimed: first-call costs land here
    rows = []
    for rep in range(args.repeats):
        for budget in budgets if rep % 2 == 0 else budgets[::-1]:
            records, makespan = replay(model, budget, requests, arrivals, args)
            s = summarize(records, makespan)
            row = {"pass": rep, "budget": budget, "makespan_s": makespan, "summary": s}
            rows.append(row)
            name = f"on, {budget}" if budget else "off"
            print(
                f"| {rep} | {name} | {s['ttft_ms']['median']:.0f} | {s['ttft_ms']['p99']:.0f} | {s['tpot_ms']['median']:.0f} | "
                f"{s['tpot_ms']['p99']:.0f} | {s['itl_ms']['p99']:.0f} | {makespan:.1f} |",
                flush=True,
            )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"hardware": hardware(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
