"""Our engine against vLLM-CPU and Transformers on the same core, the same weights and the same prompts.

Three sides, each in a process of its own (so thread settings and allocator state cannot leak
from one to another), each measured the same way:

* ``ours``: ``LLMEngine`` (full model; and POP prefill under the default plan, the last third of
  the layers skipped for prompt tokens ``1..N-1``).
* ``hf``: Transformers ``generate`` on the checkpoint folder, as a user would load it.
* ``vllm``: vLLM's offline ``LLM`` (``vllm-cpu`` in its own venv, ``--vllm-python``), prefix caching
  off, ``VLLM_CPU_OMP_THREADS_BIND`` set to the cores the run may use.

Every side gets the same token-id prompts (seeded, random ids from the ordinary vocabulary) and is
timed by the wall clock around a whole batched call, best of ``--repeats`` after one warm-up call
of the same shape:

* **decode tok/s** at batch ``B``: ``B * (new - 1) / (t(new tokens) - t(1 token))``, so the prompt's
  prefill (and each side's fixed cost per call) cancels out; prompts of ``--decode-prompt-len``.
* **prefill tok/s** at batch ``B`` and prompt length ``L``: ``B * L / t(1 token)``; for ours also
  under POP, whose ideal ratio to full is the FLOPs ratio (``prefill_speedup.pop_prefill_flops``).

Greedy tokens of the first decode case are compared across the sides (float32; exact agreement is
expected, a mismatch is printed with its first differing position). The run records the CPU
(``lscpu`` model and ISA flags), thread count and load average: hosts differ, and a shared host's
numbers move with its load.

    python benchmarks/vllm_peer.py --threads 1 --json benchmarks/results/peers/vllm_cpu_1thread.json
    python benchmarks/vllm_peer.py --threads 2 --decode-batches 16 --prefill-lens 512 --prefill-batches 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIDES = ("ours", "hf", "vllm")


# ---- measurement, the same for every side ------------------------------------------------------


def _best(call, repeats: int) -> float:
    call()  # warm-up: kernels and primitives for this shape, allocator pools
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(generate, spec: dict) -> dict:
    """``generate(prompts, new) -> token lists``: the side's batched greedy call."""
    out = {"decode": [], "prefill": []}
    prompts_all = spec["decode_prompts"]
    for b in spec["decode_batches"]:
        new = spec["decode_new"] if b < 64 else spec["decode_new_64"]
        prompts = prompts_all[:b]
        t_new = _best(lambda: generate(prompts, new), spec["repeats"])
        t_one = _best(lambda: generate(prompts, 1), spec["repeats"])
        out["decode"].append(
            {"batch": b, "new": new, "t_new_s": t_new, "t_one_s": t_one, "tok_s": b * (new - 1) / (t_new - t_one)}
        )
        print(f"  decode B={b:3d}: {out['decode'][-1]['tok_s']:7.1f} tok/s", file=sys.stderr, flush=True)
    out["tokens"] = generate(prompts_all[:1], spec["decode_new"])[0]
    for length in spec["prefill_lens"]:
        for b in spec["prefill_batches"]:
            if b * length > spec["max_prefill_tokens"]:
                continue
            prompts = [p[:length] for p in spec["prefill_prompts"][:b]]
            t = _best(lambda: generate(prompts, 1), spec["prefill_repeats"])
            out["prefill"].append({"len": length, "batch": b, "t_s": t, "tok_s": b * length / t})
            print(f"  prefill L={length:5d} B={b}: {t * 1e3:8.1f} ms", file=sys.stderr, flush=True)
    return out


# ---- the sides ----------------------------------------------------------------------------------


def side_ours(spec: dict, pop: bool) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    from pop_disagg.config import EngineConfig, PruneConfig
    from pop_disagg.engine.engine import LLMEngine
    from pop_disagg.engine.sampling import SamplingParams

    torch.set_num_threads(spec["threads"])
    config = EngineConfig(
        model=spec["model_dir"],
        prune=PruneConfig() if pop else PruneConfig(no_prune=True),
        enable_prefix_caching=False,  # repeats send the same prompts: time their prefill every time
        max_num_seqs=max(spec["decode_batches"] + spec["prefill_batches"]),
        max_num_batched_tokens=spec["max_num_batched_tokens"],
        kv_cache_memory_mb=spec["kv_cache_gib"] * 1024,
        cpu_blas=spec["cpu_blas"],
    )
    engine = LLMEngine(config)

    def generate(prompts, new):
        params = SamplingParams(max_new_tokens=new, ignore_eos=True)
        return [o.token_ids for o in engine.generate(prompts, params)]

    if pop:  # POP changes prefill only; its decode is the full model's, measured above
        spec = {**spec, "decode_batches": []}
    result = measure(generate, spec)
    from pop_disagg.models import cpu_blas

    result["cpu_blas"] = cpu_blas.active()
    result["plan_skip_layers"] = list(engine.plan.skip_layers) if pop else []
    return result


def side_hf(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).eval()

    @torch.inference_mode()
    def generate(prompts, new):
        ids = torch.tensor(prompts)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=model.config.eos_token_id if model.config.eos_token_id is not None else 0,
        )
        return out[:, ids.shape[1] :].tolist()

    return measure(generate, spec)


def side_vllm(spec: dict) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(spec["kv_cache_gib"]))))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0" if spec["threads"] == 1 else f"0-{spec['threads'] - 1}"
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=spec["model_dir"],
        dtype="float32",
        enable_prefix_caching=False,
        max_model_len=max(spec["prefill_lens"] + [spec["decode_prompt_len"] + spec["decode_new"]]) + 8,
        max_num_seqs=max(spec["decode_batches"] + spec["prefill_batches"]),
        max_num_batched_tokens=spec["max_num_batched_tokens"],
        seed=0,
    )

    def generate(prompts, new):
        params = SamplingParams(temperature=0.0, max_tokens=new, min_tokens=new, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    result = measure(generate, spec)
    import vllm

    result["vllm"] = vllm.__version__
    return result


# ---- the driver ---------------------------------------------------------------------------------


def host_info() -> dict:
    info = {"platform": platform.platform(), "load_avg_start": os.getloadavg()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                info["cpu"] = value.strip()
            if key.strip() == "CPU(s)":
                info["cpu_count"] = int(value.strip())
            if key.strip() == "Flags":
                flags = value.split()
                info["isa_flags"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    except (OSError, subprocess.CalledProcessError):
        info["cpu"] = platform.processor()
    return info


def make_spec(args) -> dict:
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from pop_disagg.models.registry import resolve_model

    model_dir = str(resolve_model(args.model))
    tok = AutoTokenizer.from_pretrained(model_dir)
    special = set(tok.all_special_ids)
    rng = np.random.default_rng(args.seed)
    vocab = [i for i in range(min(len(tok), 40000)) if i not in special and i > 100]

    def prompts(n, length):
        return [[int(t) for t in rng.choice(vocab, size=length)] for _ in range(n)]

    batches = [int(b) for b in args.decode_batches.split(",")]
    prefill_lens = [int(x) for x in args.prefill_lens.split(",")]
    prefill_batches = [int(b) for b in args.prefill_batches.split(",")]
    return {
        "model": args.model,
        "model_dir": model_dir,
        "threads": args.threads,
        "repeats": args.repeats,
        "prefill_repeats": args.prefill_repeats,
        "decode_batches": batches,
        "decode_prompt_len": args.decode_prompt_len,
        "decode_new": args.decode_new,
        "decode_new_64": args.decode_new_64,
        "decode_prompts": prompts(max(batches), args.decode_prompt_len),
        "prefill_lens": prefill_lens,
        "prefill_batches": prefill_batches,
        "prefill_prompts": prompts(max(prefill_batches), max(prefill_lens)),
        "max_num_batched_tokens": max(max(prefill_lens) * max(prefill_batches), 8192),
        "max_prefill_tokens": args.max_prefill_tokens,
        "kv_cache_gib": args.kv_cache_gib,
        "cpu_blas": args.cpu_blas,
    }


def run_side(name: str, spec_path: Path, python: str) -> dict | None:
    out = spec_path.with_name(f"{name}.json")
    cmd = [python, str(Path(__file__).resolve()), "--side", name, "--spec", str(spec_path), "--json", str(out)]
    print(f"[{name}] {' '.join(cmd)}", file=sys.stderr, flush=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, stdout=sys.stderr, env=env)  # the side's own logs go to stderr
    if proc.returncode != 0 or not out.exists():
        print(f"[{name}] failed with exit code {proc.returncode}", file=sys.stderr)
        return None
    return json.loads(out.read_text())


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def report(spec: dict, results: dict, host: dict) -> str:
    ours, hf, vl, pop = (results.get(k) for k in ("ours", "hf", "vllm", "ours_pop"))
    flags = " ".join(host.get("isa_flags", []))
    lines = [
        f"{host.get('cpu', '?')} ({host.get('cpu_count', '?')} CPUs; {flags}), {spec['threads']} thread(s), "
        f"load {host['load_avg_start'][0]:.2f} -> {host['load_avg_end'][0]:.2f}; {spec['model']} float32; "
        f"our GEMMs: {ours.get('cpu_blas') if ours else '?'}",
        "",
        "| case | ours | Transformers | vLLM-CPU | ours / vLLM | ours / Transformers |",
        "|---|---|---|---|---|---|",
    ]

    def cell(r, kind, i, key):
        return r[kind][i][key] if r and i < len(r[kind]) else None

    def fmt(x, unit=""):
        return f"{x:.1f}{unit}" if x is not None else "n/a"

    def ratio(a, b):
        return f"{a / b:.2f}x" if a is not None and b else "n/a"

    for i, row in enumerate((ours or hf or vl)["decode"]):
        o, h, v = (cell(r, "decode", i, "tok_s") for r in (ours, hf, vl))
        lines.append(
            f"| decode tok/s, batch {row['batch']} ({spec['decode_prompt_len']}-token prompt, {row['new']} new) "
            f"| {fmt(o)} | {fmt(h)} | {fmt(v)} | {ratio(o, v)} | {ratio(o, h)} |"
        )
    for i, row in enumerate((ours or hf or vl)["prefill"]):
        o, h, v = (cell(r, "prefill", i, "t_s") for r in (ours, hf, vl))
        p = cell(pop, "prefill", i, "t_s")
        ms = lambda x: f"{x * 1e3:.0f} ms" if x is not None else "n/a"  # noqa: E731
        speed = lambda a, b: f"{b / a:.2f}x" if a and b else "n/a"  # noqa: E731 - time ratio: b/a = a faster
        lines.append(
            f"| full prefill, {row['len']} tokens, batch {row['batch']} | {ms(o)} | {ms(h)} | {ms(v)} "
            f"| {speed(o, v)} | {speed(o, h)} |"
        )
        if pop:
            lines.append(
                f"| POP prefill ({len(pop['plan_skip_layers'])} layers skipped), {row['len']} tokens, batch {row['batch']} "
                f"| {ms(p)} | | | {speed(p, v)} | {speed(p, h)} (vs our full: {speed(p, o)}) |"
            )
    lines.append("")
    lines.append("Prefill columns: time for the whole batch to its first token; ratios are speed (peer time / ours).")
    base = next((r["tokens"] for r in (ours, hf, vl) if r), None)
    for name, r in (("ours", ours), ("Transformers", hf), ("vLLM-CPU", vl)):
        if r and base is not None:
            at = first_mismatch(base, r["tokens"])
            lines.append(
                f"- greedy tokens, {name}: {'equal' if at is None else f'first differs at token {at}'} ({len(r['tokens'])} tokens)"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sides", default="ours,hf,vllm")
    p.add_argument("--decode-batches", default="1,16,64")
    p.add_argument("--decode-prompt-len", type=int, default=32)
    p.add_argument("--decode-new", type=int, default=64)
    p.add_argument("--decode-new-64", type=int, default=32, help="new tokens at batch 64 and up")
    p.add_argument("--prefill-lens", default="128,512,2048")
    p.add_argument("--prefill-batches", default="1,8")
    p.add_argument("--repeats", type=int, default=3, help="best of this many after a warm-up (decode)")
    p.add_argument("--prefill-repeats", type=int, default=2, help="best of this many after a warm-up (prefill)")
    p.add_argument(
        "--max-prefill-tokens", type=int, default=1 << 30, help="skip prefill cases of more tokens (batch x length)"
    )
    p.add_argument("--no-pop", action="store_true", help="skip our POP prefill cases")
    p.add_argument("--cpu-blas", default="auto", help="our engine's CPU GEMM backend (models/cpu_blas.py)")
    p.add_argument("--kv-cache-gib", type=int, default=2)
    p.add_argument("--vllm-python", default=str(ROOT.parent / ".venv-vllm" / "bin" / "python"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    p.add_argument("--side", choices=SIDES + ("ours_pop",), help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.side:  # a child process: one side, its results written to --json
        spec = json.loads(args.spec.read_text())
        run = {"ours": lambda: side_ours(spec, False), "ours_pop": lambda: side_ours(spec, True)}
        run.update({"hf": lambda: side_hf(spec), "vllm": lambda: side_vllm(spec)})
        args.json.write_text(json.dumps(run[args.side]()))
        return

    host = host_info()
    spec = make_spec(args)
    sides = [s for s in args.sides.split(",") if s]
    if "ours" in sides and not args.no_pop:
        sides.insert(sides.index("ours") + 1, "ours_pop")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        for side in sides:
            python = args.vllm_python if side == "vllm" else sys.executable
            if side == "vllm" and not Path(python).exists():
                print(f"[vllm] no vLLM python at {python} (build it: bash ../shared/tools/vllm-cpu-venv.sh); skipped")
                continue
            results[side] = run_side(side, spec_path, python)
    host["load_avg_end"] = os.getloadavg()
    text = report(spec, results, host)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        slim = {k: v for k, v in spec.items() if not k.endswith("_prompts")}
        args.json.write_text(json.dumps({"host": host, "spec": slim, "results": results, "table": text}, indent=1))


if __name__ == "__main__":
    main()
