"""Soak: hundreds of requests against a real server while workers are killed and transfers stall.

    python benchmarks/soak.py [--model smollm2-135m-instruct] [--requests 500] [--json FILE]

Starts a disaggregated POP server (1 prefill + 1 decode worker, embedded Ray, 127.0.0.1) and
sends ``--requests`` streaming requests, open loop: Poisson arrivals at ``--rate`` per second,
each on its own client thread, whatever the server answers. The mix (seeded): normal
requests, requests the client cancels at a random moment, requests with a short deadline, and bad
requests (each must get ``INVALID_ARGUMENT``). Every normal request carries a 60 s deadline:
nothing here should take that long. Faults fire on a schedule (shares of the arrival span): kill -9 of
the prefill worker's process, a stalled KV transfer (the prefill worker's sender pauses past
``--transfer-timeout``), kill -9 of the decode worker's process, and so on (``FAULTS``). A fault
window runs from the fault until ``Health`` shows every worker serving again.

Before any fault, each distinct prompt runs once to record its fault-free greedy tokens; every
later successful normal request is compared with them. At the end the script waits for the
server to go idle and reads every worker's free blocks.

Reported (printed and written as JSON): requests by outcome (every request accounted for), hangs
(calls not ended within their deadline + 10 s, watched by a separate thread), token mismatches
against the fault-free run, leaked blocks per decode worker (total - free once idle) and prefill
tokens still queued, worker restarts, and p50/p99 client-side TTFT (time to the first streamed
token) of successful normal requests started inside vs outside fault windows.

Bursts past the admission queue limit (``--bursts``): after the faults, the queue limit is set to
``--max-queued`` and 4x that many requests arrive at once; the JSON counts those refused with
``RESOURCE_EXHAUSTED`` (every other one must complete, and the blocks must still all come back).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import signal
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import grpc
import ray

from pop_disagg._proto import generation_pb2 as pb
from pop_disagg._proto import generation_pb2_grpc as pb_grpc
from pop_disagg.config import EngineConfig, ServeConfig
from pop_disagg.server.app import BackgroundServer

NORMAL_DEADLINE_S = 60.0
HANG_MARGIN_S = 10.0
# (share of the arrival span, fault): each fires once at that point of the run.
FAULTS = [
    (0.12, "kill_prefill"),
    (0.26, "stall_transfer"),
    (0.40, "kill_decode"),
    (0.54, "cancel_storm"),
    (0.66, "stall_transfer"),
    (0.80, "kill_prefill"),
    (0.90, "kill_decode"),
]
MIX = {"normal": 0.70, "cancel": 0.10, "short_deadline": 0.10, "bad": 0.10}
BAD = [
    dict(max_new_tokens=4),  # no prompt
    dict(prompt_token_ids=[5, 6], top_p=0.0),
    dict(prompt_token_ids=[5, 6], max_new_tokens=10**6),
    dict(prompt_token_ids=[5, 10**7]),
    dict(prompt="hi", prompt_token_ids=[5, 6]),
    dict(prompt_token_ids=[5, 6], temperature=-1.0),
]


@dataclass
class Record:
    index: int
    kind: str
    start: float
    end: float = 0.0
    outcome: str = ""
    ttft_s: float | None = None
    num_tokens: int = 0
    deadline_s: float = NORMAL_DEADLINE_S
    mismatch: bool = False
    detail: str = ""  # the status message of a failed call


class Soak:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.prompts: list[list[int]] = []
        self.reference: dict[int, list[int]] = {}
        self.records: list[Record] = []
        self.windows: list[list[float]] = []  # [start, end] of each fault
        self.faults_done: list[dict] = []
        self.completed = 0
        self.lock = threading.Lock()
        self.in_flight: dict[int, Record] = {}
        self.hangs: set[int] = set()
        self.stop = threading.Event()

    # ---- server --------------------------------------------------------------------------------
    def start(self):
        a = self.args
        engine = EngineConfig(model=a.model, kv_cache_memory_mb=a.kv_cache_mb)
        self.config = ServeConfig(
            engine=engine,
            topology="disaggregated",
            prefill="pop",
            transfer_timeout_s=a.transfer_timeout,
            worker_timeout_s=a.worker_timeout,
            num_threads=a.threads,
        )
        t = time.monotonic()
        self.server = BackgroundServer(self.config)
        print(f"server up in {time.monotonic() - t:.0f}s at {self.server.address}", flush=True)
        self.channel = grpc.insecure_channel(self.server.address)
        self.stub = pb_grpc.GenerationStub(self.channel)
        vocab = self.server.deployment.arch.vocab_size
        self.prompts = [
            [self.rng.randrange(min(100, vocab // 4), min(20000, vocab)) for _ in range(self.rng.randint(6, 20))]
            for _ in range(self.args.num_prompts)
        ]

    def msg(self, prompt_index: int, **kw) -> pb.GenerateRequest:
        return pb.GenerateRequest(
            prompt_token_ids=self.prompts[prompt_index], max_new_tokens=self.args.new_tokens, ignore_eos=True, **kw
        )

    def health(self):
        return self.stub.Health(pb.HealthRequest(), timeout=10)

    def wait_serving(self, timeout_s=300.0) -> float:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            h = self.health()
            if h.is_serving and all(w.state == pb.WORKER_STATE_SERVING for w in h.workers):
                return time.time()
            time.sleep(0.2)
        raise RuntimeError("the server did not recover")

    # ---- requests --------------------------------------------------------------------------------
    def fault_free_reference(self):
        for i in range(len(self.prompts)):
            got = self.stub.Generate(self.msg(i), timeout=120)
            self.reference[i] = list(got.token_ids)

    def plan(self, n: int) -> list[tuple]:
        """Per request, drawn up front (seeded): kind, prompt, bad request, deadline, cancel delay."""
        r = self.rng
        kinds = r.choices(list(MIX), weights=list(MIX.values()), k=n)
        return [
            (
                k,
                r.randrange(len(self.prompts)),
                r.randrange(len(BAD)),
                r.uniform(0.2, 1.5) if k == "short_deadline" else NORMAL_DEADLINE_S,
                r.uniform(0.0, 1.5),
            )
            for k in kinds
        ]

    def one(self, index: int, spec: tuple) -> Record:
        kind, prompt_index, bad, deadline_s, cancel_after_s = spec
        rec = Record(index, kind, time.time(), deadline_s=deadline_s)
        with self.lock:
            self.in_flight[index] = rec
        try:
            if kind == "bad":
                self.stub.Generate(pb.GenerateRequest(**BAD[bad]), timeout=30)
                rec.outcome = "OK"  # a bad request that was served: counted, and wrong
                return rec
            call = self.stub.GenerateStream(self.msg(prompt_index), timeout=rec.deadline_s)
            if kind == "cancel":
                threading.Timer(cancel_after_s, call.cancel).start()
            tokens = []
            for chunk in call:
                if chunk.token_ids and rec.ttft_s is None:
                    rec.ttft_s = time.time() - rec.start
                tokens += chunk.token_ids
            rec.outcome, rec.num_tokens = "OK", len(tokens)
            if kind == "normal" and tokens != self.reference[prompt_index]:
                rec.mismatch = True
        except grpc.RpcError as exc:
            rec.outcome, rec.detail = exc.code().name, (exc.details() or "")[:160]
        finally:
            rec.end = time.time()
            with self.lock:
                self.in_flight.pop(index, None)
                self.completed += 1
        return rec

    def watchdog(self):
        while not self.stop.is_set():
            now = time.time()
            with self.lock:
                for rec in self.in_flight.values():
                    if now - rec.start > rec.deadline_s + HANG_MARGIN_S:
                        self.hangs.add(rec.index)
            time.sleep(0.5)

    # ---- faults ------------------------------------------------------------------------------------
    def fault(self, kind: str):
        dep = self.server.deployment
        start = time.time()
        if kind == "kill_prefill":
            os.kill(ray.get(dep.prefill[0].pid.remote()), signal.SIGKILL)
        elif kind == "kill_decode":
            os.kill(ray.get(dep.decode[0].pid.remote()), signal.SIGKILL)
        elif kind == "stall_transfer":
            ray.get(dep.prefill[0].inject_fault.remote("stall_transfer", 2.5 * self.args.transfer_timeout))
            time.sleep(2.5 * self.args.transfer_timeout)  # the next transfer stalls, times out, is re-run
        elif kind == "cancel_storm":  # a burst of streams cancelled after their first token

            def cancel_one(i):
                call = self.stub.GenerateStream(self.msg(i % len(self.prompts)), timeout=NORMAL_DEADLINE_S)
                try:
                    next(call)
                except (grpc.RpcError, StopIteration):
                    pass
                call.cancel()

            with ThreadPoolExecutor(8) as pool:
                list(pool.map(cancel_one, range(16)))
        if kind.startswith("kill"):  # until the supervisor has seen it
            until = time.monotonic() + 10
            while self.health().is_serving and time.monotonic() < until:
                time.sleep(0.1)
        end = self.wait_serving()
        self.windows.append([start, end + 2.0])
        self.faults_done.append({"fault": kind, "at_completed": self.completed, "recovered_s": round(end - start, 1)})
        print(f"fault {kind} at {self.completed} completed: serving again after {end - start:.1f}s", flush=True)

    def fault_driver(self, started: float, span_s: float):
        pending = list(FAULTS)
        while pending and not self.stop.is_set():
            if time.time() - started >= pending[0][0] * span_s:
                self.fault(pending.pop(0)[1])
            time.sleep(0.1)

    def _burst_past_queue_limit(self) -> str:
        """Bursts of concurrent requests past ``--max-queued-requests`` (the admission-control part of the soak)."""
        if not self.args.bursts:
            return "off (--bursts)"
        # The limit holds for the burst only, so the rest of the run measures faults, not refusals.
        admission = self.server.server.admission
        default, admission.max_queued_requests = admission.max_queued_requests, self.args.max_queued
        try:
            with ThreadPoolExecutor(4 * self.args.max_queued) as pool:
                recs = list(
                    pool.map(
                        lambda i: self.one(10**6 + i, ("burst", i % len(self.prompts), 0, NORMAL_DEADLINE_S, 0.0)),
                        range(4 * self.args.max_queued),
                    )
                )
        finally:
            admission.max_queued_requests = default
        self.records += recs
        return f"{sum(r.outcome == 'RESOURCE_EXHAUSTED' for r in recs)} of {len(recs)} refused with RESOURCE_EXHAUSTED"

    # ---- the run --------------------------------------------------------------------------------------
    def run(self) -> dict:
        a = self.args
        self.start()
        try:
            t0 = time.time()
            self.fault_free_reference()
            print(f"fault-free reference for {len(self.prompts)} prompts in {time.time() - t0:.0f}s", flush=True)
            specs = self.plan(a.requests)
            arrivals = [0.0]
            for _ in range(a.requests - 1):
                arrivals.append(arrivals[-1] + self.rng.expovariate(a.rate))
            started = time.time()
            threads = [
                threading.Thread(target=self.watchdog, daemon=True),
                threading.Thread(target=self.fault_driver, args=(started, arrivals[-1]), daemon=True),
            ]
            for t in threads:
                t.start()
            with ThreadPoolExecutor(a.max_clients) as pool:
                futures = []
                for i, at in enumerate(arrivals):
                    time.sleep(max(0.0, started + at - time.time()))
                    futures.append(pool.submit(self.one, i, specs[i]))
                self.records = [f.result() for f in futures]
            threads[1].join()  # the last fault has recovered
            bursts = self._burst_past_queue_limit()
            wall = time.time() - started
            self.stop.set()
            leaks = self.leaks()
            return self.report(wall, leaks, bursts)
        finally:
            self.stop.set()
            self.channel.close()
            self.server.stop()

    def leaks(self) -> dict:
        dep = self.server.deployment
        end = time.monotonic() + 60
        while True:
            decode = [ray.get(a.stats.remote(), timeout=30) for a in dep.decode]
            queued = [ray.get(a.load.remote(), timeout=30) for a in dep.prefill]
            if (
                all(s["num_free_blocks"] == s["num_blocks"] for s in decode)
                and not any(queued)
                or time.monotonic() > end
            ):
                break
            time.sleep(0.5)
        return {
            "decode_leaked_blocks": [s["num_blocks"] - s["num_free_blocks"] for s in decode],
            "decode_total_blocks": [s["num_blocks"] for s in decode],
            "prefill_queued_tokens": queued,
        }

    def report(self, wall: float, leaks: dict, bursts: str) -> dict:
        recs = self.records
        outcomes: dict[str, dict[str, int]] = {}
        for r in recs:
            outcomes.setdefault(r.kind, {}).setdefault(r.outcome, 0)
            outcomes[r.kind][r.outcome] += 1

        def in_window(r):
            return any(s <= r.start <= e for s, e in self.windows)

        def pct(xs, q):
            xs = sorted(xs)
            return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3) if xs else None

        ttft = {"during_faults": [], "outside_faults": []}
        for r in recs:
            if r.kind == "normal" and r.outcome == "OK" and r.ttft_s is not None:
                ttft["during_faults" if in_window(r) else "outside_faults"].append(r.ttft_s)
        health = self.health()
        result = {
            "model": self.args.model,
            "topology": "disaggregated+pop (1P1D)",
            "requests": len(recs),
            "accounted_for": sum(1 for r in recs if r.outcome) == len(recs),
            "wall_s": round(wall),
            "outcomes": outcomes,
            "hangs": len(self.hangs),
            "token_mismatches": sum(r.mismatch for r in recs),
            "bad_requests_not_invalid_argument": sum(
                1 for r in recs if r.kind == "bad" and r.outcome != "INVALID_ARGUMENT"
            ),
            **leaks,
            "restarts": {w.role: w.num_restarts for w in health.workers},
            "kv_retries": self.server.server.router.stats.num_kv_retries,
            "faults": self.faults_done,
            "bursts": bursts,
            "ttft_ms": {
                k: {
                    "n": len(v),
                    "p50": pct(v, 0.5),
                    "p99": pct(v, 0.99),
                    "mean": round(statistics.mean(v) * 1e3) if v else None,
                }
                for k, v in ttft.items()
            },
            "config": {k: v for k, v in vars(self.args).items() if k != "json"},
            "host": {
                "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(),
                "load_avg": os.getloadavg(),
            },
            "records": [asdict(r) for r in recs],
        }
        return result


def markdown(r: dict) -> str:
    """The README table of one run."""
    kinds = ["normal", "cancel", "short_deadline", "bad"] + [
        k for k in r["outcomes"] if k not in ("normal", "cancel", "short_deadline", "bad")
    ]
    codes = sorted({c for k in r["outcomes"].values() for c in k})
    rows = ["| request kind | " + " | ".join(codes) + " | total |", "|---|" + "---|" * (len(codes) + 1)]
    for k in kinds:
        got = r["outcomes"].get(k, {})
        rows.append(f"| {k} | " + " | ".join(str(got.get(c, 0)) for c in codes) + f" | {sum(got.values())} |")
    t = r["ttft_ms"]
    faults = ", ".join(f"{f['fault']} ({f['recovered_s']:.0f} s)" for f in r["faults"])
    rows += [
        "",
        "| | |",
        "|---|---|",
        f"| requests | {r['requests']} (accounted for: {'all' if r['accounted_for'] else 'NO'}), {r['wall_s']} s |",
        f"| hangs (not ended by deadline + 10 s) | {r['hangs']} |",
        f"| leaked blocks per decode worker (of total) | {r['decode_leaked_blocks']} (of {r['decode_total_blocks']}); prefill tokens still queued {r['prefill_queued_tokens']} |",
        f"| token mismatches vs the fault-free run | {r['token_mismatches']} |",
        f"| bad requests not answered INVALID_ARGUMENT | {r['bad_requests_not_invalid_argument']} |",
        f"| restarts | prefill {r['restarts'].get('prefill', 0)}, decode {r['restarts'].get('decode', 0)}; prefill/transfer re-runs {r.get('kv_retries', 0)} |",
        f"| faults (time to serving again) | {faults} |",
        f"| TTFT p50 / p99, normal requests started outside fault windows | {t['outside_faults']['p50']} / {t['outside_faults']['p99']} ms (n={t['outside_faults']['n']}) |",
        f"| TTFT p50 / p99, started inside fault windows | {t['during_faults']['p50']} / {t['during_faults']['p99']} ms (n={t['during_faults']['n']}) |",
        f"| bursts past the queue limit | {r['bursts']} |",
    ]
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--rate", type=float, default=0.8, help="request arrivals per second (Poisson)")
    p.add_argument("--max-clients", type=int, default=64, help="client threads (requests in flight at most)")
    p.add_argument("--num-prompts", type=int, default=24, help="distinct prompts (each gets a fault-free reference)")
    p.add_argument("--new-tokens", type=int, default=6)
    p.add_argument("--kv-cache-mb", type=int, default=64)
    p.add_argument("--transfer-timeout", type=float, default=5.0)
    p.add_argument("--worker-timeout", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument(
        "--bursts",
        action="store_true",
        help="end with a burst of 4 x --max-queued concurrent requests while the queue limit is --max-queued",
    )
    p.add_argument("--max-queued", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="benchmarks/results/soak/smollm2-135m-instruct.json")
    p.add_argument("--report", metavar="FILE", help="print the markdown table of a saved run and exit")
    args = p.parse_args()
    if args.report:
        with open(args.report) as f:
            print(markdown(json.load(f)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(name)s] %(message)s", stream=sys.stderr)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        result = Soak(args).run()
    finally:
        ray.shutdown()
    summary = {k: v for k, v in result.items() if k != "records"}
    print(json.dumps(summary, indent=1))
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    ok = (
        result["hangs"] == 0
        and not any(result["decode_leaked_blocks"])
        and not any(result["prefill_queued_tokens"])
        and result["accounted_for"]
    )
    print("ACCEPTANCE:", "pass (0 hangs, 0 leaked blocks, every request accounted for)" if ok else "FAIL")


if __name__ == "__main__":
    main()
