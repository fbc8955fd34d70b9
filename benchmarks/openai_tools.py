"""The OpenAI API checked with the tools users run: lm-evaluation-harness and guidellm.

``lm-eval``: the two local tasks under ``tests/data/lm_eval`` (``pop_mc``: 24 multiple-choice
questions, loglikelihood; ``pop_gen``: 12 one-word answers, greedy ``generate_until``) through
lm-eval's ``local-completions`` against a served SmolLM2, and through lm-eval's in-process models
on the same checkpoint:

- a POP server (1P1D, last third skipped in prefill) vs lm-eval's ``hf`` model on ``pop_mc``: the
  server scores prompts on the full model (``prompt_logprobs_mode`` ``full``, the default), so every
  choice's log-likelihood must match Transformers' (tolerance 2e-3 per choice) and so must acc;
- the POP server vs lm-eval's ``pop-disagg`` model (in-process POP, the same plan) on ``pop_gen``:
  the same greedy answers;
- a full-prefill server (``--prefill full``) vs ``hf`` on ``pop_gen``: the same greedy answers.

``guidellm``: a synchronous and a constant-rate profile of synthetic prompts with the local
tokenizer against a POP server, each run to completion (guidellm lives in its own virtual
environment, ``--guidellm``, because it would replace packages of the project's). Both write
JSON under ``--out-dir`` and print Markdown for ``benchmarks/results/openai_tools/README.md``.

    python benchmarks/openai_tools.py lm-eval
    python benchmarks/openai_tools.py guidellm --guidellm /work/.venv-guidellm/bin/guidellm
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a source checkout

SERVED = "smollm2"
TOL = 2e-3


def start(model_dir: str, prefill: str):
    import ray

    from pop_disagg.config import EngineConfig, ServeConfig
    from pop_disagg.server.app import BackgroundServer

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    engine = EngineConfig(model=model_dir, kv_cache_memory_mb=64, max_model_len=1024)
    config = ServeConfig(engine=engine, topology="disaggregated", prefill=prefill, transfer_timeout_s=60)
    return BackgroundServer(config, http_port=0, served_model_name=SERVED)


def lm_eval_run(model: str, model_args: str, task: str, limit: int | None) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    os.chdir(ROOT)  # the task YAMLs name their data from the repository root
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    tm = TaskManager(include_path="tests/data/lm_eval", include_defaults=False)
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=[task], task_manager=tm, limit=limit, log_samples=True
    )
    out["wall_s"] = time.perf_counter() - t0
    return out


def served_args(server, model_dir: str) -> str:
    url = f"{server.http_url}/v1/completions"
    return f"model={SERVED},base_url={url},tokenizer={model_dir},tokenizer_backend=huggingface,max_retries=1"


def compare(name: str, a: dict, b: dict, task: str) -> dict:
    """Scores of both runs, and how their per-sample answers differ."""
    sa, sb = a["samples"][task], b["samples"][task]
    row = {"comparison": name, "task": task, "n": len(sa), "wall_s": [round(a["wall_s"], 1), round(b["wall_s"], 1)]}
    metrics = [k for k in a["results"][task] if k.endswith(",none") and "stderr" not in k]
    row["scores"] = {k: [a["results"][task][k], b["results"][task][k]] for k in metrics}
    if task == "pop_mc":
        diffs = [abs(x[0][0] - y[0][0]) for p, q in zip(sa, sb) for x, y in zip(p["resps"], q["resps"])]
        row["max_abs_loglik_diff"] = max(diffs)
        row["within_tol"] = max(diffs) <= TOL
    else:
        row["same_answers"] = sum(p["resps"] == q["resps"] for p, q in zip(sa, sb))
    return row


def cmd_lm_eval(args) -> list[dict]:
    import lm_eval.models  # noqa: F401  (the harness's own model types, before ours joins the registry)

    import pop_disagg.eval.lm_eval_adapter  # noqa: F401  (registers "pop-disagg")

    hf_args = f"pretrained={args.model_dir},dtype=float32,device=cpu"
    rows = []
    pop = start(args.model_dir, "pop")
    try:
        skip = ";".join(str(i) for i in pop.deployment.family.default_plan.skip_layers)
        served_mc = lm_eval_run("local-completions", served_args(pop, args.model_dir), "pop_mc", args.limit)
        served_gen = lm_eval_run("local-completions", served_args(pop, args.model_dir), "pop_gen", args.limit)
    finally:
        pop.stop()
    rows.append(compare("POP server vs hf", served_mc, lm_eval_run("hf", hf_args, "pop_mc", args.limit), "pop_mc"))
    local_pop = lm_eval_run("pop-disagg", f"model={args.model_dir},skip_layers={skip}", "pop_gen", args.limit)
    rows.append(compare("POP server vs pop-disagg (in-process POP)", served_gen, local_pop, "pop_gen"))
    full = start(args.model_dir, "full")
    try:
        full_gen = lm_eval_run("local-completions", served_args(full, args.model_dir), "pop_gen", args.limit)
    finally:
        full.stop()
    rows.append(compare("full server vs hf", full_gen, lm_eval_run("hf", hf_args, "pop_gen", args.limit), "pop_gen"))
    return rows


def cmd_guidellm(args) -> list[dict]:
    server = start(args.model_dir, "pop")
    rows = []
    try:
        for profile in ("kind=synchronous", f"kind=constant,rate={args.rate}"):
            out = Path(args.out_dir) / f"guidellm_{profile.split(',')[0].split('=')[1]}.json"
            cmd = [
                args.guidellm,
                "run",
                "--backend",
                f"kind=openai_http,target={server.http_url},model={SERVED}",
                "--profile",
                profile,
                "--data",
                f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}",
                "--tokenizer",
                f"kind=huggingface_auto,model={args.model_dir}",
                "--constraint",
                f"kind=max_requests,count={args.num_requests}",
                "--output",
                f"kind=json,path={out}",
                "--disable-console-interactive",
            ]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            rows.append(
                {
                    "profile": profile,
                    "command": " ".join(cmd),
                    "returncode": proc.returncode,
                    "wall_s": round(time.perf_counter() - t0, 1),
                    "stdout_tail": proc.stdout[-6000:],
                    "stderr_tail": proc.stderr[-3000:],
                    "json": str(out),
                }
            )
    finally:
        server.stop()
    return rows


def main() -> int:
    from pop_disagg.models.registry import is_prepared, model_dir, prepare

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["lm-eval", "guidellm"])
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    p.add_argument("--guidellm", default="guidellm", help="the guidellm executable")
    p.add_argument("--rate", type=float, default=1.0, help="constant profile: requests per second")
    p.add_argument("--num-requests", type=int, default=20)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results" / "openai_tools"))
    args = p.parse_args()
    name = "smollm2-135m-instruct"
    args.model_dir = str(model_dir(name) if is_prepared(model_dir(name)) else prepare(name))
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    rows = cmd_lm_eval(args) if args.what == "lm-eval" else cmd_guidellm(args)
    path = Path(args.out_dir) / f"{args.what.replace('-', '_')}.json"
    path.write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
