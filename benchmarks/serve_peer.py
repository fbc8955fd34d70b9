"""End to end against vLLM-CPU behind the same client: ``vllm bench serve`` on random prompts.

``vllm serve`` (prefix caching on, its default) and ``pop-disagg serve --http-port`` colocated and
disaggregated (POP prefill, prefix caching on, its default), one after the other, each answering
the same ``vllm bench serve --dataset-name random`` runs: every ``--cases`` entry is
``input:output:concurrency`` (default 256 in / 32 out and 128 in / 64 out, at concurrency 2 and
8), EOS ignored, the same seed. Random prompts share no prefix, so the prefix caches do not help
either side. Reports TTFT mean/p50/p99, TPOT mean/p99 and output throughput, and the ratio of ours
to vLLM's per case; the host's ``lscpu`` flags and ``uptime`` go in the JSON.

    python benchmarks/serve_peer.py --out benchmarks/results/peers
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefix_cache import Served, machine, vllm_bench  # noqa: E402


def cases(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in c.split(":")) for c in text.split(",")]


def run(args) -> dict:
    out = Path(args.out)
    result = {"machine_before": machine(), "args": vars(args), "systems": {}}
    for system in args.systems.split(","):
        with Served(system, args, out / "logs") as served:
            rows = {}
            for inp, outp, conc in cases(args.cases):
                dataset = ["--dataset-name", "random", "--random-input-len", str(inp)]
                dataset += ["--random-output-len", str(outp), "--random-range-ratio", "0"]
                name = f"serve_{system}_{inp}_{outp}_c{conc}"
                rows[f"{inp}:{outp}:{conc}"] = vllm_bench(served.url, args, out / "serve_runs", name, dataset, conc)
                print(system, name, json.dumps(rows[f"{inp}:{outp}:{conc}"]), flush=True)
            result["systems"][system] = {"cases": rows, "uptime_after": machine()["uptime"]}
    result["machine_after"] = machine()
    return result


def table(result: dict) -> str:
    systems = result["systems"]
    lines = [
        "| case (in:out:concurrency) | server | TTFT mean / p50 / p99 (ms) | TPOT mean / p99 (ms) | output tok/s |"
    ]
    lines.append("|---|---|---|---|---|")
    for case in next(iter(systems.values()))["cases"]:
        base = systems.get("vllm", {}).get("cases", {}).get(case)
        for system, row in systems.items():
            r = row["cases"][case]
            ratio = ""
            if base and system != "vllm":
                ratio = f" (TTFT {base['mean_ttft_ms'] / r['mean_ttft_ms']:.2f}x, TPOT {base['mean_tpot_ms'] / r['mean_tpot_ms']:.2f}x vLLM)"
            lines.append(
                f"| {case} | {system}{ratio} | {r['mean_ttft_ms']:.0f} / {r['median_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f} "
                f"| {r['mean_tpot_ms']:.1f} / {r['p99_tpot_ms']:.1f} | {r['output_throughput']:.1f} |"
            )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/peers")
    p.add_argument("--model-dir", default=str(Path.home() / ".cache/pop-disagg/models/smollm2-135m-instruct"))
    p.add_argument("--systems", default="vllm,colocated,disaggregated")
    p.add_argument("--cases", default="256:32:2,256:32:8,128:64:2,128:64:8")
    p.add_argument("--num-prompts", type=int, default=16, help="requests per case")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1, help="torch threads per pop-disagg worker")
    p.add_argument("--vllm-cores", default="0", help="VLLM_CPU_OMP_THREADS_BIND")
    p.add_argument("--vllm-kv-gib", type=float, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--serve-args", default="", help="more pop-disagg serve flags")
    p.add_argument("--table", action="store_true", help="only print the table of OUT/serve_peer.json")
    args = p.parse_args()
    path = Path(args.out) / "serve_peer.json"
    if not args.table:
        (Path(args.out) / "serve_runs").mkdir(parents=True, exist_ok=True)
        result = run(args)
        path.write_text(json.dumps(result, indent=1))
    print(table(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
