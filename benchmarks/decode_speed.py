"""Decode speed: greedy tokens/s of our engine against Transformers ``generate`` on the
same weights in the same run, next to the machine's roofline for one decode step.

On a CPU it also times a step's GEMMs alone, on the model's own weights, with torch's BLAS and with
numpy's OpenBLAS (``model_gemms_s``): Transformers' step over the fastest of those is the most any
step built on that GEMM could reach against it, whatever the rest of the step costs.

For each model and batch size both sides decode the same random prompts greedily (EOS ignored).
What is timed is the steady-state decode: the clock is read after every generated token (our
``LLMEngine.step``; a ``streamer`` callback inside Transformers ``generate``), and decode tok/s is
``B * (new - 1) / (time of the last token - time of the first token)``, so neither side's prefill
is in it. The end-to-end rate (prefill included) is reported too.

The Transformers peer holds *contiguous copies* of our weights in its own (out, in) layout, i.e.
what a user of ``generate`` runs; our engine runs its fused q/k/v and gate/up GEMMs.

Roofline of one step at batch ``B`` and mean context ``S``: bytes = every weight once (the tied
LM head counted once) + the K/V of ``B * S`` positions in every layer; FLOPs = ``B`` times one
token's FLOPs (``prefill_speedup.decode_step_flops``). Both are set against rates measured here
at start-up: read bandwidth (sum over a 256 MiB tensor) and GEMM throughput, both at the model's
own shape (the fused gate/up GEMM at ``M = B``) and a 1024^3 peak. "x of limit" = measured step
time / max(bytes / bandwidth, FLOPs / peak GEMM rate).

    python benchmarks/decode_speed.py --threads 1 --clock cpu --models smollm2-135m-instruct \\
        --batch-sizes 1,16,64 --json benchmarks/results/decode/smollm2-135m-instruct.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from prefill_speedup import decode_step_flops, hardware  # noqa: E402

from pop_disagg.config import EngineConfig, PruneConfig  # noqa: E402
from pop_disagg.engine.engine import LLMEngine  # noqa: E402
from pop_disagg.engine.sampling import SamplingParams  # noqa: E402
from pop_disagg.models.arch import ModelArch  # noqa: E402
from pop_disagg.models.decoder import DecoderLayer  # noqa: E402
from pop_disagg.models.loader import load_model, resolve_dtype  # noqa: E402
from pop_disagg.models.presets import PRESETS, build_random_model, preset_config, transformers_config, transformers_peer  # noqa: E402

BLOCK_SIZE = 16


DEVICE = torch.device("cpu")  # set by --device; on CUDA every clock reading waits for the GPU


def clock(kind: str) -> float:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    return time.process_time() if kind == "cpu" else time.perf_counter()


def _best(f, n: int, kind: str) -> float:
    f()
    times = []
    for _ in range(n):
        t0 = clock(kind)
        f()
        times.append(clock(kind) - t0)
    return min(times)


def machine_rates(kind: str, arch: ModelArch, batch: int, dtype: torch.dtype) -> dict:
    """Read bandwidth (bytes/s) and GEMM rates (FLOP/s) measured now, on this thread."""
    dev = DEVICE
    big = torch.randn(64 * 2**20, dtype=torch.float32, device=dev).to(dtype)  # 256 MiB in float32
    if dev.type == "cuda":  # HBM: a bigger read so launch latency does not count
        big = torch.randn(512 * 2**20, dtype=dtype, device=dev)
    bw = big.numel() * big.element_size() / _best(big.sum, 3, kind)
    big = None  # free the buffer before the GEMM operands are allocated
    n = 8192 if dev.type == "cuda" else 1024
    a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
    peak = 2 * n**3 / _best(lambda: a @ b, 5, kind)
    # The model's own largest GEMM at M = batch, weights streamed from memory (not cache-resident).
    h, i = arch.hidden_size, arch.intermediate_size
    ws = [torch.randn(h, 2 * i, dtype=dtype, device=dev) for _ in range(max(2, (256 * 2**20) // (h * 2 * i * 4)))]
    x = torch.randn(batch, h, dtype=dtype, device=dev)
    model_gemm = 2 * batch * h * 2 * i * len(ws) / _best(lambda: [x @ w for w in ws], 2, kind)
    return {"read_bw": bw, "gemm_peak": peak, "gemm_at_batch": model_gemm}


def model_gemms_s(model, batch: int, kind: str) -> dict:
    """Seconds of one decode step's GEMMs alone at ``M = batch``, per CPU BLAS: every layer's fused
    q/k/v, o, gate/up and down projections and the LM head, on the model's own weights in the
    engine's layouts, in layer order (so weights stream from memory as in a step, not from cache),
    best of 3. Nothing else of a step runs, so ``Transformers' step / this`` bounds the ratio any
    step built on that GEMM could reach."""
    from pop_disagg.models import cpu_blas

    weights = [
        w_t
        for layer in model.model.layers
        for w_t in (
            layer.self_attn.qkv.weight_t,
            layer.self_attn.o.weight_t,
            layer.mlp.gate_up.weight_t,
            layer.mlp.down_proj.weight.t(),
        )
    ]
    gemms = [(torch.randn(batch, w_t.shape[0], dtype=model.dtype, device=model.device), w_t) for w_t in weights]
    x_head = torch.randn(batch, model.arch.hidden_size, dtype=model.dtype, device=model.device)
    before = cpu_blas.active()
    # One-row GEMMs stay with torch's under either setting (cpu_blas.MIN_OPENBLAS_ROWS): one column then.
    backends = ["torch"] + (
        ["openblas"] if batch >= cpu_blas.MIN_OPENBLAS_ROWS and cpu_blas.numpy_has_openblas() else []
    )
    out = {}
    try:
        with torch.inference_mode():
            for backend in backends:
                cpu_blas.configure(backend)
                step = gemms + [(x_head, model.head_t(x_head))]  # the layout compute_logits picks for this backend
                out[backend] = _best(lambda: [cpu_blas.linear(x, w_t) for x, w_t in step], 3, kind)
    finally:
        cpu_blas.configure(before)
    return out


def step_roofline(model, batch: int, context: float, rates: dict) -> dict:
    arch = model.arch
    item = model.dtype.itemsize
    weight_bytes = sum(p.numel() for p in model.parameters()) * item
    kv_bytes = batch * context * arch.kv_bytes_per_token(item)
    flops = batch * decode_step_flops(arch, int(context))
    t_mem = (weight_bytes + kv_bytes) / rates["read_bw"]
    t_flop = flops / rates["gemm_peak"]
    return {
        "weight_bytes": weight_bytes,
        "kv_bytes": kv_bytes,
        "flops": flops,
        "t_mem_s": t_mem,
        "t_flop_s": t_flop,
        "t_flop_at_batch_s": flops / rates["gemm_at_batch"],
        "t_limit_s": max(t_mem, t_flop),
    }


_ENGINES: dict[tuple, LLMEngine] = {}


def run_ours(
    model, prompts: list[list[int]], new: int, kind: str, enforce_eager: bool, compile_cpu: bool = False
) -> tuple[list[list[int]], list[float], float]:
    """(tokens, clock after each generated token, clock at start).

    One engine per (model, batch) for the whole run: a compiled decode step (``compile_cpu``) is
    then compiled during the untimed warm-up and reused by the timed repeats, as in a server.
    """
    b = len(prompts)
    per_seq = len(prompts[0]) + new
    key = (id(model), b, per_seq, enforce_eager, compile_cpu)
    engine = _ENGINES.get(key)
    if engine is None:
        kv_mb = b * (per_seq + BLOCK_SIZE) * model.arch.kv_bytes_per_token(model.dtype.itemsize) / 2**20 + 1
        config = EngineConfig(
            model="benchmark",
            dtype=str(model.dtype).removeprefix("torch."),
            device=model.device.type,
            block_size=BLOCK_SIZE,
            kv_cache_memory_mb=kv_mb,
            max_num_seqs=b,
            max_num_batched_tokens=b * per_seq,
            prune=PruneConfig(no_prune=True),
            enforce_eager=enforce_eager,
            compile_decode_on_cpu=compile_cpu,
            enable_prefix_caching=False,  # repeats run the same prompts: time their prefill every time
        )
        engine = _ENGINES[key] = LLMEngine(config, model=model, tokenizer=None)
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    t0 = clock(kind)
    ids = [engine.add_request(p, params) for p in prompts]
    stamps, out = [], {}
    while engine.has_unfinished():
        outs = engine.step()
        if outs:
            stamps.append(clock(kind))
        for o in outs:
            out[o.request_id] = o.token_ids
    return [out[i] for i in ids], stamps, t0


class _Stamps:
    """A ``generate`` streamer that only records the clock when new tokens arrive."""

    def __init__(self, kind: str):
        self.kind, self.stamps, self.calls = kind, [], 0

    def put(self, value):
        self.calls += 1
        if self.calls > 1:  # the first call carries the prompt
            self.stamps.append(clock(self.kind))

    def end(self):
        pass


def run_hf(peer, prompts: list[list[int]], new: int, kind: str) -> tuple[list[list[int]], list[float], float]:
    ids = torch.tensor(prompts, dtype=torch.long, device=DEVICE)
    streamer = _Stamps(kind)
    t0 = clock(kind)
    with torch.inference_mode():
        out = peer.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=0,
            streamer=streamer,
        )
    return out[:, ids.shape[1] :].tolist(), streamer.stamps, t0


def rates_from(tokens: list[list[int]], stamps: list[float], t0: float, batch: int) -> dict:
    new = len(tokens[0])
    decode_s = stamps[-1] - stamps[0]
    return {
        "decode_tok_s": batch * (new - 1) / decode_s,
        "step_s": decode_s / (new - 1),
        "e2e_tok_s": batch * new / (stamps[-1] - t0),
    }


def build(name: str, dtype: torch.dtype):
    if name in PRESETS:
        raw = preset_config(name)
        model = build_random_model(ModelArch.from_hf_dict(raw, source=f"preset {name}"), dtype, DEVICE.type, seed=0)
        return model, transformers_config(raw), f"preset {name} (random weights)"
    from transformers import AutoConfig

    from pop_disagg.models.registry import resolve_model

    path = resolve_model(name)
    return load_model(path, dtype, DEVICE.type), AutoConfig.from_pretrained(path), f"checkpoint {path}"


def bench_model(args, name: str) -> dict:
    dtype = resolve_dtype(args.dtype)
    model, hf_config, source = build(name, dtype)
    peer = transformers_peer(model, hf_config, contiguous=True)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for b in args.batch_sizes:
        prompts = torch.randint(0, model.arch.vocab_size, (b, args.prompt_len), generator=gen).tolist()
        rates = machine_rates(args.clock, model.arch, b, dtype)
        ours, theirs, agree = [], [], None
        for i in range(args.warmup + args.repeats):
            # Alternate the order so drift on a shared host does not favour one side.
            order = ("ours", "hf") if i % 2 == 0 else ("hf", "ours")
            got = {}
            for side in order:
                if side == "ours":
                    t_run = time.perf_counter()
                    got[side] = run_ours(
                        model, prompts, args.new_tokens, args.clock, args.enforce_eager, args.compile_cpu
                    )
                    if i == 0 and args.compile_cpu:
                        print(
                            f"batch {b}: first run (incl. torch.compile of its buckets) {time.perf_counter() - t_run:.1f} s wall",
                            flush=True,
                        )
                else:
                    got[side] = run_hf(peer, prompts, args.new_tokens, args.clock)
            if i >= args.warmup:
                ours.append(rates_from(*got["ours"], b))
                theirs.append(rates_from(*got["hf"], b))
            agree = sum(x == y for s, t in zip(got["ours"][0], got["hf"][0]) for x, y in zip(s, t))
        med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
        roof = step_roofline(model, b, args.prompt_len + args.new_tokens / 2, rates)
        row = {
            "batch_size": b,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "ours_decode_tok_s": med(ours, "decode_tok_s"),
            "hf_decode_tok_s": med(theirs, "decode_tok_s"),
            "ours_step_ms": med(ours, "step_s") * 1e3,
            "hf_step_ms": med(theirs, "step_s") * 1e3,
            "ours_e2e_tok_s": med(ours, "e2e_tok_s"),
            "hf_e2e_tok_s": med(theirs, "e2e_tok_s"),
            "all_ours": ours,
            "all_hf": theirs,
            "tokens_agree": f"{agree}/{b * args.new_tokens}",
            "rates": rates,
            "roofline": roof,
        }
        if model.device.type == "cpu" and all(isinstance(layer, DecoderLayer) for layer in model.model.layers):
            row["gemms_only_s"] = model_gemms_s(model, b, args.clock)
        row["ratio"] = row["ours_decode_tok_s"] / row["hf_decode_tok_s"]
        row["x_of_limit"] = row["ours_step_ms"] / 1e3 / roof["t_limit_s"]
        rows.append(row)
        print_row(name, row, flush=True)
    return {"model": name, "source": source, "rows": rows}


HEAD = (
    "| model | batch | ours tok/s | Transformers tok/s | ours / Transformers | ours step ms | limit ms (mem / FLOPs) "
    "| ours / limit | e2e ours / Transformers tok/s | tokens agree | GEMMs alone ms (torch / OpenBLAS) | ceiling / Transformers |"
)


def print_row(name: str, r: dict, flush: bool = False) -> None:
    roof = r["roofline"]
    print(
        f"| {name} | {r['batch_size']} | {r['ours_decode_tok_s']:.1f} | {r['hf_decode_tok_s']:.1f} | {r['ratio']:.2f} | "
        f"{r['ours_step_ms']:.1f} | {roof['t_limit_s'] * 1e3:.1f} ({roof['t_mem_s'] * 1e3:.1f} / {roof['t_flop_s'] * 1e3:.1f}) | "
        f"{r['x_of_limit']:.2f}x | {r['ours_e2e_tok_s']:.1f} / {r['hf_e2e_tok_s']:.1f} | {r['tokens_agree']} | {_gemm_cells(r)} |",
        flush=flush,
    )


def _gemm_cells(r: dict) -> str:
    """The GEMMs-alone times and the ratio a step made of nothing but the fastest of them would
    reach against Transformers' measured step (the ceiling for that GEMM)."""
    g = r.get("gemms_only_s")
    if not g:
        return "- | -"
    times = " / ".join(f"{g[k] * 1e3:.1f}" if k in g else "-" for k in ("torch", "openblas"))
    return f"{times} | {r['hf_step_ms'] / 1e3 / min(g.values()):.2f}x"


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--models", default="smollm2-135m-instruct,cpu", help="registry names, presets or folders, comma separated"
    )
    p.add_argument("--batch-sizes", type=_ints, default=[1, 16, 64])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="process CPU time (shared hosts; with --threads 1) or wall",
    )
    p.add_argument("--enforce-eager", action="store_true", help="our engine without the compiled decode step")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu, or cuda: model, peer and rooflines on the GPU (HBM bandwidth; with --clock wall)",
    )
    p.add_argument(
        "--compile-cpu",
        action="store_true",
        help="our engine with torch.compile'd decode buckets on CPU (compiled in the warm-up)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--report", type=Path, default=None, help="only print the table of a saved --json")
    args = p.parse_args(argv)
    if args.report:
        saved = json.loads(args.report.read_text())
        print(HEAD + "\n" + "|---" * HEAD.count("|") + "|"[:0])
        for m in saved["models"]:
            for r in m["rows"]:
                print_row(m["model"], r)
        return 0
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and args.clock == "cpu":
        p.error("--device cuda needs --clock wall (the CPU clock does not see GPU time)")
    hw = hardware()
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    print(
        f"hardware: {hw.get('cpu')}, {hw.get('cpu_count')} CPUs, torch {hw['torch']} ({hw['torch_threads']} threads), CPU GEMMs {hw['cpu_blas']}; "
        f"clock {args.clock}; load average {' '.join(load_before)}"
    )
    print(HEAD)
    print("|---" * (HEAD.count("|") - 1) + "|")
    result = {
        "hardware": hw,
        "load_before": load_before,
        "args": {k: str(v) for k, v in vars(args).items()},
        "models": [],
    }
    for name in args.models.split(","):
        result["models"].append(bench_model(args, name))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    with open("/proc/loadavg") as f:
        result["load_after"] = f.read().split()[:3]
    print(f"load average after: {' '.join(result['load_after'])}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
