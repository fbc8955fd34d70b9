"""Depth as a serving knob: fixed prefill depths against the SLO controller, one load.

Starts one ``pop-disagg serve`` (1P1D, disaggregated POP) with a plan family
``--prune-ratios 0,0.2,0.34,0.5 --adaptive-depth --ttft-slo-ms T`` and, for every rate of a
Poisson sweep, sends the same requests (same seed, same arrival schedule, ``pop_disagg.bench``'s
open-loop client) five times: each fixed plan asked for explicitly per request (``prune_ratio``:
full, 20%, 33%, 50%; an explicit ratio bypasses the controller) and once without a ratio, so the
controller picks. Serving every mode from one server keeps the workers, weights and warm-up equal;
the controller's throughput estimates are therefore warm when its runs start (it learns from every
request, fixed ones too), as on a server that has been up for a while.

Reported per (rate, mode): goodput under the TTFT SLO (requests meeting it per second of the run),
SLO attainment, TTFT p50/p99, the plan mix (from each response's ``timings.prune_ratio``), and the
traffic-weighted quality cost: the mean over served requests of the perplexity ratio of the plan
that request got, from benchmarks/results/fidelity/README.md (SmolLM2-135M, 30 layers: 1.02 at 6
skipped layers, 1.17 at 10, 1.28 at 12, 1.89 at 15; 1.00 for full). ``0.34`` is the ratio that
skips 10 of SmolLM2's 30 layers, the fidelity table's "33%" row (``0.33`` would floor to 9).

    python benchmarks/depth_slo.py                   # SmolLM2 on CPU, defaults sized for 2 shared cores
    python benchmarks/depth_slo.py --rates 0.5,1 --num-requests 30 --slo-ms 3000 --input-len 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_configs import free_port, stop_server, wait_ready  # noqa: E402

from pop_disagg.bench.metrics import summarize  # noqa: E402
from pop_disagg.bench.runner import RunSettings, run_requests  # noqa: E402
from pop_disagg.bench.workloads import LengthSpec, random_requests  # noqa: E402

# Perplexity / full, SmolLM2-135M-Instruct, by layers skipped (benchmarks/results/fidelity/README.md).
PPL_RATIO_SMOLLM2 = {0: 1.00, 6: 1.02, 10: 1.17, 12: 1.28, 15: 1.89}
FAMILY = (0.0, 0.2, 0.34, 0.5)
MODES = [("full", 0.0), ("20%", 0.2), ("33%", 0.34), ("50%", 0.5), ("adaptive", None)]


def run_mode(address: str, rate: float, ratio: float | None, requests, warmup, args) -> dict:
    settings = RunSettings(
        request_rate=rate,
        num_requests=len(requests),
        num_warmup=len(warmup),
        seed=args.seed,
        ignore_eos=True,
        prune_ratio=ratio,
        request_timeout_s=600,
    )
    run = asyncio.run(run_requests(address, settings, requests, warmup, show_progress=False))
    if run.is_interrupted:  # Ctrl-C: the runner kept what it had; stop the sweep (and the server)
        raise KeyboardInterrupt
    summary = summarize(run.records, run.duration_s, {"ttft": args.slo_ms})
    served = [r for r in run.records if r.is_success and r.server_timings]
    layers = [r.server_timings["num_skipped_layers"] for r in served]
    mix = {f"{n}": layers.count(n) for n in sorted(set(layers))}
    cost = float(np.mean([PPL_RATIO_SMOLLM2[n] for n in layers])) if layers else None
    return {
        "rate": rate,
        "prune_ratio": ratio,
        "summary": summary,
        "mix_by_skipped_layers": mix,
        "ppl_ratio_mean": cost,
        "records": [r.to_json() for r in run.records],
    }


def format_table(results: list[dict], slo_ms: float) -> str:
    lines = [
        f"| rate (req/s) | mode | goodput (req/s, TTFT <= {slo_ms:g} ms) | SLO attainment | TTFT p50 (ms) | TTFT p99 (ms) | plan mix (skipped layers: requests) | ppl / full (traffic-weighted) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["summary"]
        mix = ", ".join(f"{k}: {v}" for k, v in r["mix_by_skipped_layers"].items())
        lines.append(
            f"| {r['rate']:g} | {r['mode']} | {s['goodput']:.3f} | {s['slo_attainment']:.2f} | {s['ttft_ms']['median'] or float('nan'):.0f} | "
            f"{s['ttft_ms']['p99'] or float('nan'):.0f} | {mix} | {r['ppl_ratio_mean'] or float('nan'):.3f} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--rates", default="0.4,0.8", help="Poisson request rates (req/s)")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--input-len", default="192", help="prompt length spec (see `bench serve --input-len`)")
    p.add_argument("--output-len", default="4")
    p.add_argument("--slo-ms", type=float, default=2000.0, help="the TTFT SLO (also the controller's target)")
    p.add_argument("--modes", default=",".join(m for m, _ in MODES))
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-args", default="")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results" / "depth"))
    args = p.parse_args()
    if args.model != "smollm2-135m-instruct":
        print("note: the quality column uses SmolLM2's fidelity table", file=sys.stderr)

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    address = f"127.0.0.1:{port}"
    log_path = out / "serve-depth.log"
    cmd = [
        sys.executable,
        "-m",
        "pop_disagg.cli",
        "serve",
        "--model",
        args.model,
        "--prune-ratios",
        ",".join(f"{r:g}" for r in FAMILY),
        "--adaptive-depth",
        "--ttft-slo-ms",
        f"{args.slo_ms:g}",
        "--threads",
        str(args.threads),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *shlex.split(args.serve_args),
    ]
    print(f"$ {shlex.join(cmd)}", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    modes = [(m, r) for m, r in MODES if m in args.modes.split(",")]
    results: list[dict] = []
    t0 = time.time()
    try:
        print(f"ready after {wait_ready(proc, address, log_path, 600):.0f}s", flush=True)
        from pop_disagg.bench.runner import check_server

        _, info = asyncio.run(check_server(address))
        pool = random_requests(
            args.num_requests + 2,
            LengthSpec.parse(args.input_len),
            LengthSpec.parse(args.output_len),
            int(info["vocab_size"]),
            int(info["context_limit"]),
            seed=args.seed,
        )
        warmup, requests = pool[:2], pool[2:]
        for rate in [float(r) for r in args.rates.split(",") if r]:
            for mode, ratio in modes:
                t = time.time()
                res = {"mode": mode, **run_mode(address, rate, ratio, requests, warmup, args)}
                results.append(res)
                s = res["summary"]
                print(
                    f"rate {rate:g} {mode:>8}: goodput {s['goodput']:.3f} req/s, attainment {s['slo_attainment']:.2f}, "
                    f"TTFT p50 {s['ttft_ms']['median'] or float('nan'):.0f} ms p99 {s['ttft_ms']['p99'] or float('nan'):.0f} ms, "
                    f"mix {res['mix_by_skipped_layers']}, ppl x{res['ppl_ratio_mean'] or float('nan'):.3f} ({time.time() - t:.0f}s)",
                    flush=True,
                )
                (out / "depth_slo.json").write_text(
                    json.dumps({"args": vars(args), "model_info": info, "results": results}, indent=1)
                )
    finally:
        stop_server(proc)
    table = format_table(results, args.slo_ms)
    (out / "depth_slo.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out / 'depth_slo.json'} and {out / 'depth_slo.md'} in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
