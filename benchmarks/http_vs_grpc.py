"""Overhead of the OpenAI HTTP front end against gRPC: one server, the same load, both protocols.

Starts one ``pop-disagg serve --http-port`` on 127.0.0.1 (disaggregated + POP, SmolLM2 by default),
then runs the same ``pop-disagg bench serve`` (same random token-id prompts, same seed, so the same
arrival times) with ``--backend grpc`` and ``--backend openai`` (``/v1/completions`` gets the very
same token ids), alternating the two ``--repeats`` times at each rate so that drift in a shared
machine's load falls on both. Writes one JSON per run and a Markdown table of TTFT / TPOT p50 and
p99 under ``OUT/``.

    python benchmarks/http_vs_grpc.py                        # SmolLM2 on CPU, a few minutes
    python benchmarks/http_vs_grpc.py --rates 2,8 --num-requests 100 --serve-args "--device cuda"
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_configs import free_port, start_server, stop_server, wait_ready  # noqa: E402

from pop_disagg.bench.report import load_result  # noqa: E402
from pop_disagg.cli import main as cli_main  # noqa: E402


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def table(results: list[dict]) -> str:
    rows = [
        "| backend | rate (req/s) | run | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) | E2E p50 (ms) | done/failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["summary"]
        rows.append(
            f"| {r['backend']} | {r['settings']['request_rate']} | {r['run']} | {_fmt(s['ttft_ms']['median'])} | {_fmt(s['ttft_ms']['p99'])} | "
            f"{_fmt(s['tpot_ms']['median'])} | {_fmt(s['tpot_ms']['p99'])} | {_fmt(s['e2el_ms']['median'])} | {s['num_completed']}/{s['num_failed']} |"
        )
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--rates", default="0.5,2", help="request rates (req/s), comma-separated")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--input-len", default="32")
    p.add_argument("--output-len", default="16")
    p.add_argument("--repeats", type=int, default=2, help="grpc/openai alternations per rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-args", default="", help="extra `pop-disagg serve` arguments, one string")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results" / "frontend" / "http_vs_grpc"))
    args = p.parse_args()

    out = Path(args.out_dir)
    port, http_port = free_port(), free_port()
    args.serve_args = f"{args.serve_args} --http-port {http_port}"
    log_path = out / "logs" / "serve.log"
    t_start = time.time()
    proc = start_server(args, "disaggregated", "pop", port, log_path)
    results = []
    try:
        print(f"ready after {wait_ready(proc, f'127.0.0.1:{port}', log_path, args.start_timeout):.0f}s", flush=True)
        targets = {"grpc": ["--server", f"127.0.0.1:{port}"], "openai": ["--base-url", f"http://127.0.0.1:{http_port}"]}
        for rate in [r for r in args.rates.split(",") if r]:
            for run in range(args.repeats):
                for backend in ("grpc", "openai") if run % 2 == 0 else ("openai", "grpc"):
                    path = out / f"{backend}-rate{rate}-run{run}.json"
                    argv = [
                        "bench",
                        "serve",
                        "--backend",
                        backend,
                        *targets[backend],
                        "--random-input-len",
                        args.input_len,
                        "--random-output-len",
                        args.output_len,
                        "--ignore-eos",
                        "--num-prompts",
                        str(args.num_requests),
                        "--request-rate",
                        rate,
                        "--seed",
                        str(args.seed),
                        "--num-warmup",
                        "2",
                        "--metric-percentiles",
                        "50,99",
                        "--output",
                        str(path),
                        "--no-progress",
                    ]
                    print(f"$ pop-disagg {shlex.join(argv)}", flush=True)
                    if cli_main(argv) != 0:
                        print(f"{backend} at {rate} req/s failed", file=sys.stderr)
                        continue
                    results.append({**load_result(path), "run": run})
    finally:
        stop_server(proc)
    md = table(sorted(results, key=lambda r: (float(r["settings"]["request_rate"]), r["backend"], r["run"])))
    (out / "http_vs_grpc.md").write_text(md + "\n")
    print(md)
    print(f"wrote {out / 'http_vs_grpc.md'} in {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
