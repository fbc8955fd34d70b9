"""Prefix caching against vLLM-CPU, and where the decode worker should prefill a short rest itself.

Three measurements, each starting and stopping its own servers on 127.0.0.1 (SmolLM2 by default):

* ``peers``: vLLM (``vllm serve``, automatic prefix caching on) and ``pop-disagg serve --http-port``
  colocated and disaggregated (POP), one after the other, behind the same clients:
  ``vllm bench serve --dataset-name prefix_repetition`` (prefix 384, suffix 32, 2 prefixes,
  concurrency 2) and a multi-turn chat workload (a shared system prompt, each turn sending the
  conversation so far; this script's streaming client). TTFT p50/p99, TPOT p99, throughput.
* ``concurrency``: a fixed KV budget, chat prompts with ``max_tokens`` 1024 that stop where the
  model stops: how many requests run at once (each server's running gauge, sampled) and the
  throughput, vs vLLM with the same budget (``--kv-cache-memory-bytes``), next to what reserving
  prompt + ``max_tokens`` at admission would allow.
* ``crossover``: a 1P1D POP server with ``--max-local-prefill-tokens`` 0 (the uncached rest is
  always sent) and very large (always prefilled on the decode worker); warm requests whose
  uncached rest grows; the TTFT of each. The default is the largest rest where local is no slower.

Every run records ``lscpu`` flags and ``uptime`` before and after, in the JSON under ``--out``.

    python benchmarks/prefix_cache.py peers --out benchmarks/results/prefix_cache
    python benchmarks/prefix_cache.py concurrency --out benchmarks/results/prefix_cache
    python benchmarks/prefix_cache.py crossover --out benchmarks/results/prefix_cache
    python benchmarks/prefix_cache.py table --out benchmarks/results/prefix_cache   # Markdown from the JSONs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_configs import stop_server  # noqa: E402

VLLM = Path(os.environ.get("VLLM_VENV", "/work/.venv-vllm")) / "bin" / "vllm"
NAME = "smollm2"  # the model name both servers answer to

SYSTEM = (
    "You are a careful assistant for a company that sells garden tools. Answer in plain English, "
    "in at most three sentences, without lists. If a question is about prices, say that prices "
    "change and point to the online shop. If a question is about safety, start with the safety "
    "advice. Never invent product names. The company was founded in 1987, ships to Europe and "
    "North America, and offers a two-year warranty on every tool. Returns are free within thirty days."
)
QUESTIONS = [
    "How do I sharpen pruning shears?",
    "What is the best time of year to plant tulip bulbs?",
    "Can I use a hedge trimmer in the rain?",
    "How long does the warranty last?",
    "Why do my tomato leaves turn yellow?",
    "What should I wear when I use a chainsaw?",
    "How often should I water a new lawn?",
    "Do you ship to Canada?",
    "How do I store garden tools over winter?",
    "What is the difference between a spade and a shovel?",
    "How deep should I dig to plant a small tree?",
    "Can I return a rake I bought last week?",
    "How do I get rid of moss on my lawn?",
    "Which soil is best for growing carrots?",
    "How do I clean rust off a trowel?",
    "What is compost made of?",
]


# ---- machine ------------------------------------------------------------------------------------
def machine() -> dict:
    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    lscpu = run(["lscpu"])
    info = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    return {
        "model_name": info.get("Model name", "").strip(),
        "cpus": info.get("CPU(s)", "").strip(),
        "flags": info.get("Flags", "").strip(),
        "uptime": run(["uptime"]),
    }


# ---- servers ------------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {shlex.join(cmd)}", flush=True)
    with open(log_path, "w") as log:
        # Its own session, so stopping it reaches everything it started (Ray's worker processes).
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})}
        )


def wait_http(proc: subprocess.Popen, url: str, log_path: Path, timeout_s: float = 600) -> None:
    import urllib.request

    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; log tail:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{url} did not answer within {timeout_s:g}s (log: {log_path})")


def server_cmd(system: str, args, port: int, metrics_port: int, extra: list[str] = ()) -> tuple[list[str], dict]:
    """The command (and environment) that serves ``system`` on ``port``."""
    if system == "vllm":
        cmd = [str(VLLM), "serve", args.model_dir, "--dtype", "float32", "--max-model-len", str(args.max_model_len)]
        cmd += ["--port", str(port), "--host", "127.0.0.1", "--served-model-name", NAME, "--enable-prefix-caching"]
        env = {"VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib), "VLLM_CPU_OMP_THREADS_BIND": args.vllm_cores}
        return cmd + list(extra), env
    topology = "colocated" if system == "colocated" else "disaggregated"
    cmd = [sys.executable, "-m", "pop_disagg.cli", "serve", "--model", args.model_dir, "--topology", topology]
    cmd += ["--prefill", "pop", "--host", "127.0.0.1", "--port", str(free_port()), "--http-port", str(port)]
    cmd += [
        "--served-model-name",
        NAME,
        "--metrics-port",
        str(metrics_port),
        "--max-model-len",
        str(args.max_model_len),
    ]
    cmd += ["--threads", str(args.threads), *shlex.split(args.serve_args), *extra]
    return cmd, {"PYTHONPATH": str(REPO)}


class Served:
    def __init__(self, system: str, args, log_dir: Path, extra: list[str] = (), tag: str = ""):
        self.system, self.port, self.metrics_port = system, free_port(), free_port()
        cmd, env = server_cmd(system, args, self.port, self.metrics_port, extra)
        self.log = log_dir / f"{system}{tag}.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_url = (
            self.url + "/metrics" if system == "vllm" else f"http://127.0.0.1:{self.metrics_port}/metrics"
        )
        self.proc = start(cmd, self.log, env)

    def __enter__(self):
        try:
            wait_http(self.proc, self.url, self.log)
        except BaseException:
            stop_server(self.proc)
            raise
        return self

    def __exit__(self, *exc):
        stop_server(self.proc)


def kv_bytes_per_token(model_dir: str) -> int:
    """float32 K and V of every layer for one token, from the checkpoint's config.json."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return 2 * c["num_hidden_layers"] * c.get("num_key_value_heads", c["num_attention_heads"]) * head_dim * 4


# ---- clients ------------------------------------------------------------------------------------
PREFIX_REPETITION = ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", "384"]
PREFIX_REPETITION += ["--prefix-repetition-suffix-len", "32", "--prefix-repetition-num-prefixes", "2"]


def vllm_bench(
    url: str, args, out_dir: Path, name: str, dataset: list[str] | None = None, concurrency: int = 2
) -> dict:
    """``vllm bench serve`` against ``url``: the prefix_repetition workload, or ``dataset`` (its
    ``--dataset-name ...`` arguments, output length included)."""
    cmd = [str(VLLM), "bench", "serve", "--backend", "openai", "--base-url", url, "--model", NAME]
    cmd += ["--tokenizer", args.model_dir]
    cmd += dataset or [*PREFIX_REPETITION, "--prefix-repetition-output-len", str(args.output_len)]
    cmd += ["--num-prompts", str(args.num_prompts), "--max-concurrency", str(concurrency), "--ignore-eos"]
    cmd += ["--seed", "0", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99"]
    cmd += ["--save-result", "--result-dir", str(out_dir), "--result-filename", f"{name}.vllm_bench.json"]
    print(f"$ {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=3600)
    r = json.loads((out_dir / f"{name}.vllm_bench.json").read_text())
    keys = ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "output_throughput")
    keys += ("request_throughput", "completed")
    return {k: r.get(k) for k in keys}


async def _chat_turn(client, url: str, messages: list[dict], max_tokens: int, ignore_eos: bool) -> dict:
    body = {"model": NAME, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    if ignore_eos:
        body["ignore_eos"] = True
    t0 = time.perf_counter()
    first = last = None
    text, usage = [], {}
    async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {}).get("content")
                if delta:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    text.append(delta)
    n = usage.get("completion_tokens", 0)
    details = usage.get("prompt_tokens_details") or {}
    return {
        "ttft_ms": 1e3 * ((first or time.perf_counter()) - t0),
        "tpot_ms": 1e3 * (last - first) / (n - 1) if first and n > 1 else None,
        "output_tokens": n,
        "prompt_tokens": usage.get("prompt_tokens"),
        "cached_tokens": details.get("cached_tokens"),
        "text": "".join(text),
    }


async def multi_turn(url: str, num_conversations: int, num_turns: int, max_tokens: int, concurrency: int = 2) -> dict:
    """Conversations sharing a system prompt; each turn sends everything so far plus a new question."""
    import httpx

    rng = random.Random(0)
    sem = asyncio.Semaphore(concurrency)
    turns: list[dict] = []

    async def conversation(c: int, client) -> None:
        messages = [{"role": "system", "content": SYSTEM}]
        for t in range(num_turns):
            messages.append({"role": "user", "content": rng.choice(QUESTIONS)})
            async with sem:
                r = await _chat_turn(client, url, messages, max_tokens, ignore_eos=True)
            turns.append({"conversation": c, "turn": t, **{k: v for k, v in r.items() if k != "text"}})
            messages.append({"role": "assistant", "content": r["text"]})

    t0 = time.perf_counter()
    async with httpx.AsyncClient() as client:
        await asyncio.gather(*(conversation(c, client) for c in range(num_conversations)))
    wall = time.perf_counter() - t0
    return {"turns": turns, "wall_s": wall, **summary(turns, wall)}


def _pct(values: list[float], q: float) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def summary(turns: list[dict], wall_s: float) -> dict:
    ttft = [t["ttft_ms"] for t in turns]
    tpot = [t["tpot_ms"] for t in turns]
    return {
        "median_ttft_ms": statistics.median(ttft) if ttft else None,
        "p99_ttft_ms": _pct(ttft, 99),
        "p99_tpot_ms": _pct(tpot, 99),
        "output_throughput": sum(t["output_tokens"] for t in turns) / wall_s,
        "completed": len(turns),
    }


def _gauge(metrics_url: str, names: tuple[str, ...]) -> float | None:
    import urllib.request

    try:
        with urllib.request.urlopen(metrics_url, timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.split("{")[0].split(" ")[0] in names:
            return float(line.rsplit(" ", 1)[1])
    return None


async def concurrency_run(served: Served, num_requests: int, max_tokens: int) -> dict:
    """Every chat prompt at once (``max_tokens`` each, natural stops), the running gauge sampled."""
    import httpx

    names = ("vllm:num_requests_running", "pop_disagg:num_requests_running")
    samples: list[float] = []
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            v = await asyncio.to_thread(_gauge, served.metrics_url, names)
            if v is not None:
                samples.append(v)
            await asyncio.sleep(0.25)

    sampler = asyncio.ensure_future(sample())
    t0 = time.perf_counter()
    async with httpx.AsyncClient() as client:
        msgs = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS]
        results = await asyncio.gather(
            *(_chat_turn(client, served.url, msgs[i % len(msgs)], max_tokens, False) for i in range(num_requests))
        )
    wall = time.perf_counter() - t0
    done.set()
    await sampler
    lens = [r["output_tokens"] for r in results]
    return {
        "wall_s": wall,
        "output_throughput": sum(lens) / wall,
        "max_running": max(samples, default=None),
        "mean_running": statistics.mean(samples) if samples else None,
        "output_lens": lens,
        "prompt_tokens": [r["prompt_tokens"] for r in results],
        "median_ttft_ms": statistics.median(r["ttft_ms"] for r in results),
    }


# ---- measurements -------------------------------------------------------------------------------
def peers(args) -> None:
    out = Path(args.out)
    result = {"machine_before": machine(), "args": vars(args), "systems": {}}
    for system in args.systems.split(","):
        with Served(system, args, out / "logs") as served:
            row = {"prefix_repetition": vllm_bench(served.url, args, out, system)}
            row["multi_turn"] = asyncio.run(multi_turn(served.url, args.conversations, args.turns, args.output_len))
            row["uptime_after"] = machine()["uptime"]
            result["systems"][system] = row
            print(system, json.dumps({k: v for k, v in row["prefix_repetition"].items()}), flush=True)
    result["machine_after"] = machine()
    (out / "peers.json").write_text(json.dumps(result, indent=1))


def concurrency(args) -> None:
    out = Path(args.out)
    budget = int(args.kv_mb * 2**20)
    result = {"machine_before": machine(), "args": vars(args), "kv_budget_bytes": budget, "systems": {}}
    for system in args.systems.split(","):
        # vLLM-CPU sizes its cache from VLLM_CPU_KVCACHE_SPACE (whole GiB) and ignores
        # --kv-cache-memory-bytes; its block count can be overridden (blocks of 128 tokens on CPU).
        # Its log says what it got: "CPU KV cache size: N tokens".
        extra = ["--kv-cache-mb", str(args.kv_mb)]
        if system == "vllm":
            extra = ["--num-gpu-blocks-override", str(budget // (kv_bytes_per_token(args.model_dir) * 128))]
        with Served(system, args, out / "logs", extra, tag="-concurrency") as served:
            row = asyncio.run(concurrency_run(served, args.num_requests, args.max_tokens))
            row["uptime_after"] = machine()["uptime"]
            result["systems"][system] = row
            print(system, {k: row[k] for k in ("max_running", "mean_running", "output_throughput")}, flush=True)
    result["machine_after"] = machine()
    (out / "concurrency.json").write_text(json.dumps(result, indent=1))


def crossover(args) -> None:
    """TTFT of warm requests (a shared prefix of ``--prefix-len`` tokens held by the decode worker)
    whose uncached rest is ``k`` tokens, the rest sent (limit 0) or prefilled locally."""
    import httpx

    out = Path(args.out)
    rests = [int(x) for x in args.rests.split(",")]
    rng = random.Random(1)
    shared = [rng.randrange(100, 20000) for _ in range(args.prefix_len)]
    result = {"machine_before": machine(), "args": vars(args), "modes": {}}

    async def measure(url: str) -> dict:
        rows = {}
        async with httpx.AsyncClient() as client:

            async def ttft(prompt):
                body = {"model": NAME, "prompt": prompt, "max_tokens": 2, "stream": True, "ignore_eos": True}
                t0 = time.perf_counter()
                async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as resp:
                    async for line in resp.aiter_lines():
                        if line.startswith("data: ") and '"text"' in line:
                            return 1e3 * (time.perf_counter() - t0)

            await ttft(shared + [7])  # warm: the shared prefix is now cached
            for k in rests:
                times = []
                for rep in range(args.repeats):
                    rest = [rng.randrange(100, 20000) for _ in range(k + 1)]  # k uncached + the boundary token
                    times.append(await ttft(shared + rest))
                rows[k] = statistics.median(times)
        return rows

    for mode, limit in (("sent", 0), ("local", 100000)):
        with Served("disaggregated", args, out / "logs", ["--max-local-prefill-tokens", str(limit)], f"-{mode}") as s:
            result["modes"][mode] = asyncio.run(measure(s.url))
            print(mode, result["modes"][mode], flush=True)
    result["machine_after"] = machine()
    (out / "crossover.json").write_text(json.dumps(result, indent=1))


def _f(v, digits=0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(args) -> None:
    out = Path(args.out)
    lines = []
    if (p := out / "peers.json").exists():
        r = json.loads(p.read_text())
        lines += [
            "| server | workload | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p99 (ms) | output tok/s | requests | uptime after |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for system, row in r["systems"].items():
            for w in ("prefix_repetition", "multi_turn"):
                m = row[w]
                lines.append(
                    f"| {system} | {w} | {_f(m['median_ttft_ms'])} | {_f(m['p99_ttft_ms'])} | {_f(m['p99_tpot_ms'])} "
                    f"| {_f(m['output_throughput'], 1)} | {m['completed']} | {row['uptime_after'].split('load average:')[-1].strip()} |"
                )
        lines.append("")
    if (p := out / "concurrency.json").exists():
        r = json.loads(p.read_text())
        lines += [
            "| server | KV budget (MiB) | max running | mean running | output tok/s | output lengths |",
            "|---|---|---|---|---|---|",
        ]
        for system, row in r["systems"].items():
            lens = row["output_lens"]
            lines.append(
                f"| {system} | {r['args']['kv_mb']:g} | {_f(row['max_running'])} | {_f(row['mean_running'], 1)} "
                f"| {_f(row['output_throughput'], 1)} | {min(lens)}-{max(lens)}, median {statistics.median(lens):g} |"
            )
        lines.append("")
    if (p := out / "crossover.json").exists():
        r = json.loads(p.read_text())
        lines += ["| uncached rest (tokens) | TTFT sent (ms) | TTFT local (ms) |", "|---|---|---|"]
        for k in r["modes"]["sent"]:
            lines.append(f"| {k} | {_f(r['modes']['sent'][k])} | {_f(r['modes']['local'][k])} |")
    print("\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["peers", "concurrency", "crossover", "table"])
    p.add_argument("--out", default="benchmarks/results/prefix_cache")
    p.add_argument("--model-dir", default=str(Path.home() / ".cache/pop-disagg/models/smollm2-135m-instruct"))
    p.add_argument("--systems", default="vllm,colocated,disaggregated")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1, help="torch threads per pop-disagg worker")
    p.add_argument("--vllm-cores", default="0", help="VLLM_CPU_OMP_THREADS_BIND")
    p.add_argument("--vllm-kv-gib", type=float, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--serve-args", default="", help="more pop-disagg serve flags")
    p.add_argument("--num-prompts", type=int, default=40, help="prefix_repetition requests")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--kv-mb", type=int, default=96, help="concurrency: the KV budget of every server (MiB)")
    p.add_argument("--num-requests", type=int, default=16, help="concurrency: requests sent at once")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--prefix-len", type=int, default=256, help="crossover: the shared, cached prefix")
    p.add_argument("--rests", default="4,8,16,32,64,128", help="crossover: uncached rests to time")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    {"peers": peers, "concurrency": concurrency, "crossover": crossover, "table": table}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
