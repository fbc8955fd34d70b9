"""Depth controller judged by a deterministic replay, then checked against a live run.

Three steps, each a subcommand:

* ``profile``: the cost model (``pop_disagg.bench.replay.CostModel``) of a served configuration.
  ``--from-live depth_slo.json`` reads the server-measured timings of a ``benchmarks/depth_slo.py``
  run (prefill seconds per token by plan, transfer, the decode step: every request's
  ``server_timings``); ``--measure`` times this machine's engine instead (one thread: a prefill pass
  per plan at two lengths, decode steps by batch; transfer from ``--transfer-ms``).
* ``sweep``: Poisson traces over ``--rates`` x ``--slo-ms`` replayed for every fixed plan and both
  adaptive rules; prints goodput, SLO attainment, TTFT p50/p99, the plan mix and the traffic-weighted
  quality cost (perplexity / full per plan, from the fidelity table), checks the acceptance rule
  (``pareto_check``) at every rate, and draws the Pareto plot (goodput vs quality cost per rate).
* ``live``: the replay of a live run's own arrival schedule under the cost model fitted to that run,
  next to the live numbers, with the ranking of modes in each.

    python benchmarks/depth_replay.py profile --from-live benchmarks/results/depth/slo6000_rate0.15_0.3/depth_slo.json \\
        --out benchmarks/results/depth/replay/costs_live.json
    python benchmarks/depth_replay.py sweep --costs benchmarks/results/depth/replay/costs_live.json \\
        --rates 0.05,0.1,0.15,0.2,0.25,0.3 --slo-ms 3000,6000 --out-dir benchmarks/results/depth/replay
    python benchmarks/depth_replay.py live --costs benchmarks/results/depth/replay/costs_live.json \\
        --run benchmarks/results/depth/slo6000_rate0.15_0.3/depth_slo.json --rule greedy
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from pop_disagg.bench.replay import Arrival, CostModel, pareto_check, poisson_trace, replay  # noqa: E402

FAMILY = (0.0, 0.2, 0.34, 0.5)
# Perplexity / full of SmolLM2-135M-Instruct by plan (benchmarks/results/fidelity/README.md: 0, 6,
# 10 and 15 of 30 layers skipped).
QUALITY = (1.00, 1.02, 1.17, 1.89)
RULES = ("lookahead", "greedy")


def _cpu() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags"))
        simd = [f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma")]
        return f"{name}, {len(info.split('processor')) - 1} cores, {' '.join(sorted(simd))}"
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


# ---- profile -------------------------------------------------------------------------------------
def profile_from_live(path: Path) -> CostModel:
    run = json.loads(path.read_text())
    per_plan: dict[float, list[float]] = {r: [] for r in FAMILY}
    transfer, boundary, step = [], [], []
    for res in run["results"]:
        for rec in res["records"]:
            t = rec.get("server_timings") or {}
            if not rec.get("is_success") or not t:
                continue
            n = rec["num_prompt_tokens"] - 1
            ratio = min(FAMILY, key=lambda r: abs(r - (t.get("prune_ratio") or 0.0)))
            if t["queue_s"] < 0.01:  # found the worker idle: its pass was its own (a queued one shares a batch)
                per_plan[ratio].append(t["prefill_s"] / n)
            transfer.append(t["transfer_s"])
            boundary.append(t["ttft_s"] - t["queue_s"] - t["prefill_s"] - t["transfer_s"])
            if rec["num_output_tokens"] > 1:
                step.append(t["decode_s"] / (rec["num_output_tokens"] - 1))
    med = statistics.median
    return CostModel(
        ratios=FAMILY,
        num_layers=30,
        prefill_s_per_token=tuple(med(per_plan[r]) for r in FAMILY),
        prefill_pass_s=0.0,  # one prompt length in the run: the per-pass constant is inside the per-token figure
        transfer_fixed_s=med(transfer),
        transfer_s_per_token=0.0,
        decode_batches=(1, 2),
        # The boundary step runs alone far more often than not at these rates; later steps overlap.
        decode_step_s=(med(boundary), med(step)),
        quality=QUALITY,
        source=f"server timings of {path} ({sum(map(len, per_plan.values()))} requests); host as recorded there",
    )


def profile_measure(model: str, lengths: tuple[int, int], batches: tuple[int, ...], transfer_ms: float) -> CostModel:
    import torch

    from pop_disagg.config import EngineConfig, PruneConfig
    from pop_disagg.engine.engine import LLMEngine
    from pop_disagg.engine.sampling import SamplingParams

    torch.set_num_threads(1)

    def timed_steps(engine, prompts, steps):
        ids_in = [engine.add_request(ids, SamplingParams(max_new_tokens=64, ignore_eos=True)) for ids in prompts]
        out = []
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.step()
            out.append(time.perf_counter() - t0)
        for rid in ids_in:
            engine.abort(rid)
        return out

    per_token, pass_s, num_layers = [], [], 30
    for ratio in FAMILY:
        prune = PruneConfig(no_prune=True) if ratio == 0 else PruneConfig(ratio=ratio)
        engine = LLMEngine(EngineConfig(model=model, prune=prune))
        num_layers = engine.model.arch.num_layers
        t = []
        for n in lengths:
            ids = [(7 * i) % 1000 + 10 for i in range(n)]
            t.append(min(timed_steps(engine, [ids], 1)[0] for _ in range(3)))  # the prefill step
        slope = (t[1] - t[0]) / (lengths[1] - lengths[0])
        per_token.append(slope)
        pass_s.append(max(0.0, t[0] - slope * (lengths[0] - 1)))
    steps = []
    for b in batches:
        prompts = [[(11 * i + j) % 1000 + 10 for i in range(32)] for j in range(b)]
        s = timed_steps(engine, prompts, 8)  # prefill, boundary, then decode steps
        steps.append(statistics.median(s[2:]))
    return CostModel(
        ratios=FAMILY,
        num_layers=num_layers,
        prefill_s_per_token=tuple(per_token),
        prefill_pass_s=statistics.median(pass_s),
        transfer_fixed_s=transfer_ms / 1e3,
        transfer_s_per_token=0.0,
        decode_batches=tuple(batches),
        decode_step_s=tuple(steps),
        quality=QUALITY,
        source=f"LLMEngine on {_cpu()}, {model}, one thread, prompt lengths {lengths}; transfer {transfer_ms} ms given",
    )


# ---- sweep ---------------------------------------------------------------------------------------
def modes(costs: CostModel) -> list[str]:
    return [f"{r:g}" for r in costs.ratios] + list(RULES)


def sweep(costs: CostModel, rates, slos_s, num_requests, input_len, input_sigma, output_len, noise_cv, seed):
    rows, checks = [], []
    for slo in slos_s:
        for rate in rates:
            trace = poisson_trace(rate, num_requests, input_len, output_len, seed=seed, input_sigma=input_sigma)
            results = [replay(trace, costs, m, slo, noise_cv=noise_cv, seed=seed) for m in modes(costs)]
            ok, why = pareto_check(results)
            checks.append({"slo_ms": slo * 1e3, "rate": rate, "holds": ok, "why": why})
            rows += [{"slo_ms": slo * 1e3, "rate": rate, **r.summary} for r in results]
    return rows, checks


def table(rows) -> str:
    out = [
        "| SLO (ms) | rate (req/s) | mode | goodput (req/s) | SLO attainment | TTFT p50 (ms) | TTFT p99 (ms) | plan mix | ppl / full |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['slo_ms']:g} | {r['rate']:g} | {r['mode']} | {r['goodput']:.3f} | {r['slo_attainment']:.2f} | "
            f"{r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {'/'.join(map(str, r['mix']))} | {r['quality_cost']:.3f} |"
        )
    return "\n".join(out)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slos = sorted({r["slo_ms"] for r in rows})
    rates = sorted({r["rate"] for r in rows})
    fig, axes = plt.subplots(len(slos), len(rates), figsize=(3.2 * len(rates), 3.0 * len(slos)), squeeze=False)
    for i, slo in enumerate(slos):
        for j, rate in enumerate(rates):
            ax = axes[i][j]
            sub = [r for r in rows if r["slo_ms"] == slo and r["rate"] == rate]
            fixed = [r for r in sub if r["mode"] not in RULES]
            ax.plot(
                [r["quality_cost"] for r in fixed],
                [r["goodput"] for r in fixed],
                "o-",
                color="0.5",
                label="fixed plans",
            )
            for r in fixed:
                ax.annotate(
                    r["mode"], (r["quality_cost"], r["goodput"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
            for mode, marker in (("greedy", "s"), ("lookahead", "*")):
                r = next(x for x in sub if x["mode"] == mode)
                ax.plot(r["quality_cost"], r["goodput"], marker, markersize=10 if marker == "*" else 7, label=mode)
            ax.set_title(f"{rate:g} req/s, SLO {slo / 1e3:g} s", fontsize=9)
            ax.set_xlabel("quality cost (ppl / full)", fontsize=8)
            ax.set_ylabel("goodput (req/s)", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---- live ----------------------------------------------------------------------------------------
def live_check(costs: CostModel, run_path: Path, noise_cv: float, rule: str) -> list[dict]:
    run = json.loads(run_path.read_text())
    slo_s = run["args"]["slo_ms"] / 1e3
    names = {"full": "0", "20%": "0.2", "33%": "0.34", "50%": "0.5", "adaptive": rule}
    out = []
    for res in run["results"]:
        recs = sorted(res["records"], key=lambda r: r["scheduled_s"])
        trace = [Arrival(r["scheduled_s"], r["num_prompt_tokens"], r["max_new_tokens"]) for r in recs]
        sim = replay(trace, costs, names[res["mode"]], slo_s, noise_cv=noise_cv).summary
        live = res["summary"]
        out.append(
            {
                "rate": res["rate"],
                "mode": res["mode"],
                "live_goodput": live["goodput"],
                "live_attainment": live["slo_attainment"],
                "replay_goodput": sim["goodput"],
                "replay_attainment": sim["slo_attainment"],
                "replay_mix": sim["mix"],
            }
        )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("profile")
    src = pr.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-live", type=Path)
    src.add_argument("--measure", action="store_true")
    pr.add_argument("--model", default="smollm2-135m-instruct")
    pr.add_argument("--lengths", default="64,256")
    pr.add_argument("--batches", default="1,4,16")
    pr.add_argument("--transfer-ms", type=float, default=26.0, help="--measure: KV transfer per request")
    pr.add_argument("--out", type=Path, required=True)
    sw = sub.add_parser("sweep")
    sw.add_argument("--costs", type=Path, required=True)
    sw.add_argument("--rates", default="0.05,0.1,0.15,0.2,0.25,0.3")
    sw.add_argument("--slo-ms", default="3000,6000")
    sw.add_argument("--num-requests", type=int, default=2000)
    sw.add_argument("--input-len", type=int, default=192)
    sw.add_argument("--input-sigma", type=float, default=0.5, help="lognormal spread of prompt lengths (0: fixed)")
    sw.add_argument("--output-len", type=int, default=4)
    sw.add_argument("--noise-cv", type=float, default=0.1, help="seeded lognormal noise on service times")
    sw.add_argument("--seed", type=int, default=0)
    sw.add_argument("--out-dir", type=Path)
    lv = sub.add_parser("live")
    lv.add_argument("--costs", type=Path, required=True)
    lv.add_argument("--run", type=Path, required=True)
    lv.add_argument("--noise-cv", type=float, default=0.0)
    lv.add_argument("--rule", choices=RULES, default="lookahead", help="the rule the live server's adaptive mode ran")
    args = p.parse_args()

    if args.cmd == "profile":
        costs = (
            profile_from_live(args.from_live)
            if args.from_live
            else profile_measure(
                args.model,
                tuple(int(x) for x in args.lengths.split(",")),
                tuple(int(x) for x in args.batches.split(",")),
                args.transfer_ms,
            )
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        costs.save(args.out)
        print(json.dumps(json.loads(args.out.read_text()), indent=2))
        return 0
    costs = CostModel.load(args.costs)
    if args.cmd == "live":
        rows = live_check(costs, args.run, args.noise_cv, args.rule)
        print("| rate | mode | live goodput | replay goodput | live attainment | replay attainment | replay mix |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['rate']:g} | {r['mode']} | {r['live_goodput']:.3f} | {r['replay_goodput']:.3f} | "
                f"{r['live_attainment']:.2f} | {r['replay_attainment']:.2f} | {'/'.join(map(str, r['replay_mix']))} |"
            )
        for rate in sorted({r["rate"] for r in rows}):
            sub_rows = [r for r in rows if r["rate"] == rate]
            for key in ("live_goodput", "replay_goodput"):
                order = sorted(sub_rows, key=lambda r: -r[key])
                print(f"rate {rate:g}, ranking by {key}: " + " > ".join(r["mode"] for r in order))
        return 0
    t0 = time.perf_counter()
    rates = [float(x) for x in args.rates.split(",")]
    slos = [float(x) / 1e3 for x in args.slo_ms.split(",")]
    rows, checks = sweep(
        costs,
        rates,
        slos,
        args.num_requests,
        args.input_len,
        args.input_sigma,
        args.output_len,
        args.noise_cv,
        args.seed,
    )
    print(f"cost model: {costs.source}")
    print(table(rows))
    for c in checks:
        print(f"SLO {c['slo_ms']:g} ms, {c['rate']:g} req/s: {'holds' if c['holds'] else 'FAILS'}: {c['why']}")
    print(f"replayed {len(rows) * args.num_requests} requests in {time.perf_counter() - t0:.1f} s")
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "sweep.json").write_text(
            json.dumps(
                {
                    "args": vars(args) | {"costs": str(args.costs), "out_dir": str(args.out_dir)},
                    "costs": costs.source,
                    "rows": rows,
                    "checks": checks,
                },
                indent=2,
                default=str,
            )
            + "\n"
        )
        (args.out_dir / "sweep.md").write_text(table(rows) + "\n")
        plot(rows, args.out_dir / "pareto.png")
    return 0 if all(c["holds"] for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
