"""End-to-end serving comparison: the four server configurations under the same load.

For each of topology in {disaggregated, colocated} x prefill in {pop, full} this script starts
``pop-disagg serve`` on 127.0.0.1 (a free port, its own process group, log under
``OUT/logs/``), waits until ``Health`` answers, runs the same ``pop-disagg bench serve`` rate
sweep against it (same requests, same seed, same arrival schedule), and stops it. Then it writes
the sweep table (``OUT/e2e_serving.md``) and the plot (``OUT/e2e_serving.png``) over all runs.

The default load is sized for SmolLM2-135M on a small CPU box: random prompts of
``--input-len`` tokens (long enough that prefill dominates TTFT), ``--output-len`` generated
tokens with EOS ignored, a few rates around the box's capacity. A server that does not come up
fails the script with its log's tail.

A configuration may carry a third part, ``chunked`` (``colocated/pop/chunked``): that server runs
with ``--enable-chunked-prefill --max-num-batched-tokens CHUNK_TOKENS``, so the same
arrivals measure colocated serving with chunked prefill on vs off:

    python benchmarks/compare_configs.py --configs colocated/pop,colocated/pop/chunked \
        --input-len lognormal:128:1.0 --output-len 32 --rates 0.5 --num-requests 20

    python benchmarks/compare_configs.py                           # SmolLM2 on CPU, a few minutes
    python benchmarks/compare_configs.py --rates 1,2,4,8 --num-requests 200 --input-len 2048 \\
        --output-len 128 --serve-args "--device cuda" --slo ttft:500 tpot:50
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from pop_disagg.bench.plot import plot_sweeps  # noqa: E402
from pop_disagg.bench.report import format_sweep_table, load_result, sweep_path  # noqa: E402
from pop_disagg.bench.runner import ServerUnreachable, check_server  # noqa: E402
from pop_disagg.cli import main as cli_main  # noqa: E402

CONFIGS = [("disaggregated", "pop"), ("disaggregated", "full"), ("colocated", "pop"), ("colocated", "full")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    args, topology: str, prefill: str, port: int, log_path: Path, chunked: bool = False
) -> subprocess.Popen:
    chunking = ["--enable-chunked-prefill", "--max-num-batched-tokens", str(args.chunk_tokens)] if chunked else []
    cmd = [
        sys.executable,
        "-m",
        "pop_disagg.cli",
        "serve",
        "--model",
        args.model,
        "--topology",
        topology,
        "--prefill",
        prefill,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *chunking,
        *shlex.split(args.serve_args),
    ]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {shlex.join(cmd)}", flush=True)
    with open(log_path, "w") as log:
        # Its own session, so stopping it reaches everything it started (Ray's worker processes).
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(proc: subprocess.Popen, address: str, log_path: Path, timeout_s: float) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if proc.poll() is not None:
            tail = log_path.read_text()[-3000:]
            raise RuntimeError(f"the server exited with {proc.returncode} before answering; log tail:\n{tail}")
        try:
            asyncio.run(check_server(address, connect_timeout_s=5))
            return time.time() - t0
        except ServerUnreachable:
            time.sleep(1)
    raise RuntimeError(f"the server at {address} did not answer Health within {timeout_s:g}s (log: {log_path})")


def stop_server(proc: subprocess.Popen) -> None:
    # SIGINT first: `serve` shuts its workers down cleanly on Ctrl-C; escalate only if it hangs.
    for sig, wait_s in ((signal.SIGINT, 60), (signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue
    try:  # leftovers of its session (Ray helpers), if any
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument(
        "--configs",
        default=",".join(f"{t}/{f}" for t, f in CONFIGS),
        help="topology/prefill pairs, comma-separated; topology/prefill/chunked for chunked prefill",
    )
    p.add_argument(
        "--chunk-tokens",
        type=int,
        default=128,
        help="--max-num-batched-tokens of the chunked configurations (tokens per engine step)",
    )
    p.add_argument("--rates", default="0.1,0.2,0.4", help="request rates of the sweep (req/s)")
    p.add_argument("--num-requests", type=int, default=5)
    p.add_argument("--input-len", default="384", help="prompt length spec (see `bench serve --input-len`)")
    p.add_argument("--output-len", default="16")
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--slo", nargs="+", default=["ttft:5000", "tpot:400"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-args", default="", help="extra `pop-disagg serve` arguments, one string")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results" / "serving" / "e2e"))
    args = p.parse_args()

    out = Path(args.out_dir)
    configs = [c.split("/") for c in args.configs.split(",") if c]
    if any(len(c) not in (2, 3) or (len(c) == 3 and c[2] != "chunked") for c in configs):
        p.error(f"--configs: expected topology/prefill or topology/prefill/chunked, got {args.configs!r}")
    files: list[Path] = []
    t_start = time.time()
    for topology, prefill, *extra in configs:
        chunked = bool(extra)
        port, name = free_port(), f"{topology}-{prefill}" + ("-chunked" if chunked else "")
        log_path = out / "logs" / f"serve-{name}.log"
        proc = start_server(args, topology, prefill, port, log_path, chunked)
        try:
            ready_s = wait_ready(proc, f"127.0.0.1:{port}", log_path, args.start_timeout)
            print(f"{name}: ready after {ready_s:.0f}s", flush=True)
            argv = [
                "bench",
                "serve",
                "--server",
                f"127.0.0.1:{port}",
                "--input-len",
                args.input_len,
                "--output-len",
                args.output_len,
                "--ignore-eos",
                "--num-requests",
                str(args.num_requests),
                "--sweep-rates",
                args.rates,
                "--burstiness",
                str(args.burstiness),
                "--seed",
                str(args.seed),
                "--num-warmup",
                "2",
                "--slo",
                *args.slo,
                "--output",
                str(out / f"{name}.json"),
                "--no-progress",
            ]
            if chunked:  # the server reports topology/prefill only
                argv += ["--label", f"{topology}/{prefill}/chunked-{args.chunk_tokens}"]
            print(f"$ pop-disagg {shlex.join(argv)}", flush=True)
            rc = cli_main(argv)
            if rc == 130:
                raise KeyboardInterrupt
            if rc != 0:
                print(f"{name}: bench exited {rc}", file=sys.stderr)
        finally:
            stop_server(proc)
        files += [sweep_path(out / f"{name}.json", float(r)) for r in args.rates.split(",") if r]
    results = [load_result(f) for f in files if f.is_file()]
    table = format_sweep_table(results, markdown=True)
    (out / "e2e_serving.md").write_text(table + "\n")
    plot = plot_sweeps(
        results,
        out / "e2e_serving.png",
        title=f"{args.model}: input {args.input_len}, output {args.output_len}, SLO {' '.join(args.slo)}",
    )
    print(table)
    print(f"wrote {out / 'e2e_serving.md'} and {plot} in {time.time() - t_start:.0f}s")
    return 0 if len(results) == len(files) else 1


if __name__ == "__main__":
    sys.exit(main())
