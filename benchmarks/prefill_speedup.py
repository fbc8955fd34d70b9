"""POP prefill speedup benchmark: POP vs full prefill in our engine, next to the
FLOPs-ideal ratio, the paper's Table 2, and Transformers as a peer; plus decode throughput.

What is timed (``torch.inference_mode``, warm-up, median of repeats, CUDA synchronised):

* **TTFT**: what time-to-first-token costs in our engine, through the engine's own code path:
  ``ModelRunner.prefill`` over prompt tokens ``1..N-1`` (pruned under POP, all layers under the
  empty plan) and then ``ModelRunner.decode`` for the boundary token ``N`` (full model), which
  samples the first token. The **prefill** column is the first part alone.
* **Transformers**: ``model(input_ids, logits_to_keep=1)`` of Transformers' own model class built
  from the same config and holding the same weight tensors (no copy), over the same ``N`` tokens.
* **Decode**: greedy generation (EOS ignored) with ``LLMEngine.generate`` vs Transformers
  ``generate`` on the same model; both include the short prompt's prefill, as a user sees it.

The ideal ratio is the FLOPs ratio (POP_METHOD.md, "The ideal speedup"): a full layer costs its
linear FLOPs ``2n(P_attn + P_mlp)`` plus causal attention-score work; a skipped layer only its K/V
projections. For uniform layers that is ``1 / (1 - r(1 - f))``; we sum layer by layer, which also
covers Gemma-3's sliding-window layers. The TTFT ideal adds the unpruned boundary step to both.

Examples::

    python benchmarks/prefill_speedup.py --model cpu --lengths 32,128,512,2048 --batch-sizes 1,8
    python benchmarks/prefill_speedup.py --model llama-3.1-8b --dtype bfloat16 --device cuda --batch-sizes 8
    python benchmarks/prefill_speedup.py --model /path/to/checkpoint --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from pop_disagg.config import EngineConfig, PruneConfig  # noqa: E402
from pop_disagg.engine.engine import LLMEngine  # noqa: E402
from pop_disagg.engine.kv_cache import BlockManager, KVCache  # noqa: E402
from pop_disagg.engine.model_runner import ModelRunner  # noqa: E402
from pop_disagg.engine.request import Request  # noqa: E402
from pop_disagg.engine.sampling import SamplingParams  # noqa: E402
from pop_disagg.models.arch import ModelArch  # noqa: E402
from pop_disagg.models.decoder import CausalLM  # noqa: E402
from pop_disagg.models.loader import load_model, resolve_dtype  # noqa: E402
from pop_disagg.models.presets import PRESETS, build_random_model, preset_config, transformers_config, transformers_peer  # noqa: E402
from pop_disagg.pop.plan import PrunePlan  # noqa: E402

# POP paper Table 2: TTFT speedup at batch 8 (A100 80GB, Transformers implementation).
PAPER_TTFT_BATCH8 = {
    "llama-3.1-8b": {32: 1.22, 128: 1.27, 512: 1.34, 2048: 1.36},
    "gemma-3-12b": {32: 1.02, 128: 1.27, 512: 1.34, 2048: 1.37},
}
BLOCK_SIZE = 16


# ---- FLOPs model -------------------------------------------------------------------------------
def _visible_keys(n: int, window: int | None) -> int:
    """Sum over the n queries of a causal (optionally sliding) mask of the keys each one sees."""
    if window is None or n <= window:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


def layer_flops(arch: ModelArch, layer: int, n: int) -> tuple[float, float]:
    """(whole layer, its K/V projections) FLOPs for a prefill of ``n`` tokens of one sequence."""
    h, q, kv, inter = arch.hidden_size, arch.q_size, arch.kv_size, arch.intermediate_size
    kv_flops = 2 * n * 2 * h * kv
    linear = 2 * n * (h * q + q * h + 3 * h * inter) + kv_flops
    # QK^T and PV: 2 FLOPs per multiply-add, head_dim each, per visible (query, key) pair.
    scores = 4 * arch.num_heads * arch.head_dim * _visible_keys(n, arch.window_for_layer(layer))
    return linear + scores, kv_flops


def decode_step_flops(arch: ModelArch, context: int) -> float:
    """One full-model token over ``context`` keys, plus the LM head (the boundary step)."""
    h, q, kv, inter = arch.hidden_size, arch.q_size, arch.kv_size, arch.intermediate_size
    per_layer = [
        2 * (2 * h * q + 2 * h * kv + 3 * h * inter)
        + 4 * arch.num_heads * arch.head_dim * min(context, arch.window_for_layer(l) or context)
        for l in range(arch.num_layers)
    ]
    return sum(per_layer) + 2 * h * arch.vocab_size


def ideal_ratios(arch: ModelArch, plan: PrunePlan, num_prompt_tokens: int) -> dict:
    """FLOPs-ideal POP/full ratios for one sequence of ``num_prompt_tokens`` (N-1 are prefilled)."""
    n = num_prompt_tokens - 1
    per_layer = [layer_flops(arch, l, n) for l in range(arch.num_layers)]
    full = sum(f for f, _ in per_layer)
    skipped = set(plan.skip_layers)
    pop = sum(kvf if l in skipped else f for l, (f, kvf) in enumerate(per_layer))
    skipped_f = sum(per_layer[l][0] for l in skipped)
    f = sum(per_layer[l][1] for l in skipped) / skipped_f if skipped_f else 0.0
    boundary = decode_step_flops(arch, num_prompt_tokens)
    return {
        "r": plan.ratio,
        "f": f,
        "ideal_prefill": full / pop,
        "ideal_ttft": (full + boundary) / (pop + boundary),
        "prefill_flops_full": full,
        "prefill_flops_pop": pop,
    }


# ---- timing ------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _now(device: torch.device) -> tuple[float, float]:
    """(wall, process CPU) seconds after the device has finished its queued work.

    The CPU clock matters on shared CPU hosts: other tenants stretch wall time, while the process's
    CPU time (with one intra-op thread) is what the work itself costs. ``--clock`` picks one.
    """
    _sync(device)
    return time.perf_counter(), time.process_time()


def _since(t0: tuple[float, float], t1: tuple[float, float]) -> tuple[float, float]:
    return t1[0] - t0[0], t1[1] - t0[1]


class TTFTBench:
    """Runs the engine's prefill + boundary decode for one plan over a shared paged KV cache."""

    def __init__(self, model: CausalLM, plan: PrunePlan, kv_cache: KVCache, blocks: BlockManager):
        self.runner = ModelRunner(model, kv_cache, blocks, plan)
        self.blocks = blocks
        self.device = model.device

    def run(self, prompts: list[list[int]]) -> tuple[tuple, tuple, list[int]]:
        """Returns ((wall, cpu) seconds of the prefill, the same for TTFT, first tokens)."""
        params = SamplingParams(max_new_tokens=1, ignore_eos=True)
        reqs = [Request(f"bench-{i}", p, params) for i, p in enumerate(prompts)]
        for r in reqs:
            r.block_table = self.blocks.allocate(r.num_prompt_tokens)
        try:
            t0 = _now(self.device)
            self.runner.prefill(reqs, [r.num_prompt_tokens - 1 for r in reqs])
            t1 = _now(self.device)
            tokens = self.runner.decode(reqs)
            t2 = _now(self.device)
        finally:
            for r in reqs:
                self.blocks.free(r.block_table)
        return _since(t0, t1), _since(t0, t2), tokens


@torch.inference_mode()
def hf_forward(peer, prompts: list[list[int]], device: torch.device) -> tuple[tuple, list[int]]:
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    t0 = _now(device)
    logits = peer(input_ids=ids, use_cache=False, logits_to_keep=1).logits  # (B, 1, V)
    tokens = logits[:, -1].argmax(-1).tolist()
    return _since(t0, _now(device)), tokens


def _median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


CLOCKS = {"wall": 0, "cpu": 1}


def repeats_for(args, num_tokens: int) -> int:
    """``--repeats``, cut down for long inputs so one configuration stays within ``--token-budget``."""
    if args.token_budget is None:
        return args.repeats
    return max(1, min(args.repeats, args.token_budget // num_tokens))


def bench_prefill(args, model, peer, plan, vocab_size: int, on_row=lambda rows: None) -> list[dict]:
    arch = model.arch
    num_blocks = max(args.batch_sizes) * -(-max(args.lengths) // BLOCK_SIZE)
    kv_cache = KVCache(arch, num_blocks, BLOCK_SIZE, model.dtype, model.device)
    blocks = BlockManager(num_blocks, BLOCK_SIZE)
    full = TTFTBench(model, PrunePlan.none(arch.num_layers), kv_cache, blocks)
    pop = TTFTBench(model, plan, kv_cache, blocks)
    gen = torch.Generator().manual_seed(args.seed)
    configs = [(n, b) for b in args.batch_sizes for n in args.lengths if n * b <= args.max_tokens]
    rows = []
    bar = tqdm(configs, desc="prefill", disable=args.no_progress, file=sys.stderr)
    for n, b in bar:
        bar.set_postfix(len=n, batch=b)
        prompts = torch.randint(0, vocab_size, (b, n), generator=gen).tolist()
        repeats = repeats_for(args, n * b)
        warmup = args.warmup if n * b <= args.warmup_max_tokens else 0
        times = {k: [] for k in ("full_prefill", "full_ttft", "pop_prefill", "pop_ttft", "hf")}
        agree = None
        for i in range(warmup + repeats):
            # Alternate the order so drift (other load, clocks) does not favour one side.
            order = [("full", full), ("pop", pop)] if i % 2 == 0 else [("pop", pop), ("full", full)]
            sample = {}
            for name, bench in order:
                pre, ttft, tokens = bench.run(prompts)
                sample[f"{name}_prefill"], sample[f"{name}_ttft"] = pre, ttft
                if name == "full":
                    full_tokens = tokens
            if peer is not None:
                sample["hf"], hf_tokens = hf_forward(peer, prompts, model.device)
                agree = sum(a == c for a, c in zip(full_tokens, hf_tokens))
            if i >= warmup:
                for k, v in sample.items():
                    times[k].append(v)
        ideal = ideal_ratios(arch, plan, n)
        row = {
            "num_prompt_tokens": n,
            "batch_size": b,
            "repeats": repeats,
            "warmup": warmup,
            "clock": args.clock,
            **ideal,
        }
        for k, v in times.items():
            if v:
                for clock, i_clock in CLOCKS.items():
                    row[f"{k}_{clock}_all_ms"] = [x[i_clock] * 1e3 for x in v]
                row[f"{k}_ms"] = _median_ms([x[CLOCKS[args.clock]] for x in v])
        row["ttft_ratio"] = row["full_ttft_ms"] / row["pop_ttft_ms"]
        row["prefill_ratio"] = row["full_prefill_ms"] / row["pop_prefill_ms"]
        row["ttft_pct_of_ideal_gain"] = 100 * (row["ttft_ratio"] - 1) / (ideal["ideal_ttft"] - 1)
        row["prefill_pct_of_ideal_gain"] = 100 * (row["prefill_ratio"] - 1) / (ideal["ideal_prefill"] - 1)
        row["ttft_ratio_over_ideal"] = row["ttft_ratio"] / ideal["ideal_ttft"]
        row["prefill_ratio_over_ideal"] = row["prefill_ratio"] / ideal["ideal_prefill"]
        paper = PAPER_TTFT_BATCH8.get(args.model, {}).get(n) if b == 8 else None
        row["paper_ttft_ratio"] = paper
        if peer is not None:
            row["hf_over_ours_full"] = row["hf_ms"] / row["full_ttft_ms"]
            row["first_tokens_agree_with_hf"] = agree
        rows.append(row)
        on_row(rows)  # long sweeps: results so far reach --json even if the run is cut short
    return rows


def bench_decode(args, model, peer, vocab_size: int) -> list[dict]:
    arch = model.arch
    gen = torch.Generator().manual_seed(args.seed + 1)
    rows = []
    bar = tqdm(args.decode_batch_sizes, desc="decode", disable=args.no_progress, file=sys.stderr)
    for b in bar:
        prompts = torch.randint(0, vocab_size, (b, args.decode_prompt_len), generator=gen).tolist()
        per_seq = args.decode_prompt_len + args.decode_new_tokens
        kv_mb = math.ceil(b * (per_seq + BLOCK_SIZE) * arch.kv_bytes_per_token(model.dtype.itemsize) / 2**20) + 1
        # Full plan: the decode path is the same under POP, and it keeps the outputs comparable
        # token for token with Transformers.
        config = EngineConfig(
            model="benchmark",
            dtype=str(model.dtype).removeprefix("torch."),
            device=model.device.type,
            block_size=BLOCK_SIZE,
            kv_cache_memory_mb=kv_mb,
            max_num_seqs=b,
            max_num_batched_tokens=b * per_seq,
            prune=PruneConfig(no_prune=True),
            enable_prefix_caching=False,  # repeats run the same prompts: time their prefill every time
        )
        engine = LLMEngine(config, model=model, tokenizer=None)
        params = SamplingParams(max_new_tokens=args.decode_new_tokens, ignore_eos=True)
        ours, theirs = [], []
        ours_tokens = hf_tokens = None
        i_clock = CLOCKS[args.clock]
        for i in range(args.warmup + args.decode_repeats):
            t0 = _now(model.device)
            outs = engine.generate(prompts, params)
            if i >= args.warmup:
                ours.append(_since(t0, _now(model.device))[i_clock])
            ours_tokens = [o.token_ids for o in outs]
            if peer is not None:
                ids = torch.tensor(prompts, dtype=torch.long, device=model.device)
                t0 = _now(model.device)
                with torch.inference_mode():
                    out = peer.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        do_sample=False,
                        max_new_tokens=args.decode_new_tokens,
                        min_new_tokens=args.decode_new_tokens,
                        pad_token_id=0,
                    )
                if i >= args.warmup:
                    theirs.append(_since(t0, _now(model.device))[i_clock])
                hf_tokens = out[:, ids.shape[1] :].tolist()
        num_new = b * args.decode_new_tokens
        row = {
            "batch_size": b,
            "prompt_len": args.decode_prompt_len,
            "new_tokens": args.decode_new_tokens,
            "repeats": args.decode_repeats,
            "clock": args.clock,
            "ours_s": statistics.median(ours),
            "ours_tok_s": num_new / statistics.median(ours),
        }
        if peer is not None:
            row["hf_s"] = statistics.median(theirs)
            row["hf_tok_s"] = num_new / row["hf_s"]
            row["ours_over_hf_tok_s"] = row["ours_tok_s"] / row["hf_tok_s"]
            same = sum(a == c for x, y in zip(ours_tokens, hf_tokens) for a, c in zip(x, y))
            row["tokens_agree_with_hf"] = f"{same}/{num_new}"
        rows.append(row)
    return rows


# ---- model + report ----------------------------------------------------------------------------
def build(args):
    """(our model, Transformers config, label) for a preset name, registry name or folder."""
    dtype, device = resolve_dtype(args.dtype), torch.device(args.device)
    if args.model in PRESETS:
        raw = preset_config(args.model)
        model = build_random_model(
            ModelArch.from_hf_dict(raw, source=f"preset {args.model}"), dtype, device, seed=args.seed
        )
        return model, transformers_config(raw), f"preset {args.model} (random weights)"
    from transformers import AutoConfig

    from pop_disagg.models.registry import resolve_model

    path = resolve_model(args.model)
    return load_model(path, dtype, device), AutoConfig.from_pretrained(path), f"checkpoint {path}"


def hardware() -> dict:
    from pop_disagg.models import cpu_blas

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_blas": cpu_blas.active(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["cpu_count"] = len(
            [l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("processor")]
        )
    except OSError:
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _fmt(x, spec=".2f") -> str:
    return "—" if x is None else format(x, spec)


def print_report(prefill: list[dict], decode: list[dict], has_peer: bool) -> None:
    print("\n### Prefill: POP vs full (TTFT = pruned prefill of tokens 1..N-1 + boundary step for N)\n")
    # "% of ideal": measured ratio / ideal ratio (the issue's target); "% of gain": (ratio - 1) / (ideal - 1).
    head = [
        "N",
        "batch",
        "TTFT full ms",
        "TTFT POP ms",
        "ratio",
        "ideal",
        "% of ideal",
        "% of gain",
        "paper",
        "prefill full ms",
        "prefill POP ms",
        "ratio",
        "ideal",
        "% of ideal",
        "% of gain",
        "f (K/V share)",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in prefill:
        print(
            "| "
            + " | ".join(
                [
                    str(r["num_prompt_tokens"]),
                    str(r["batch_size"]),
                    _fmt(r["full_ttft_ms"], ".1f"),
                    _fmt(r["pop_ttft_ms"], ".1f"),
                    _fmt(r["ttft_ratio"], ".3f"),
                    _fmt(r["ideal_ttft"], ".3f"),
                    _fmt(100 * r["ttft_ratio"] / r["ideal_ttft"], ".0f"),
                    _fmt(100 * (r["ttft_ratio"] - 1) / (r["ideal_ttft"] - 1), ".0f"),
                    _fmt(r["paper_ttft_ratio"]),
                    _fmt(r["full_prefill_ms"], ".1f"),
                    _fmt(r["pop_prefill_ms"], ".1f"),
                    _fmt(r["prefill_ratio"], ".3f"),
                    _fmt(r["ideal_prefill"], ".3f"),
                    _fmt(100 * r["prefill_ratio"] / r["ideal_prefill"], ".0f"),
                    _fmt(100 * (r["prefill_ratio"] - 1) / (r["ideal_prefill"] - 1), ".0f"),
                    _fmt(r["f"] * 100, ".1f") + "%",
                ]
            )
            + " |"
        )
    if has_peer:
        print("\n### Full prefill (TTFT path) vs Transformers forward over the same N tokens, same weights\n")
        print("| N | batch | ours full ms | Transformers ms | Transformers / ours | first tokens agree |")
        print("|---|---|---|---|---|---|")
        for r in prefill:
            print(
                f"| {r['num_prompt_tokens']} | {r['batch_size']} | {r['full_ttft_ms']:.1f} | {r['hf_ms']:.1f} | "
                f"{r['hf_over_ours_full']:.2f} | {r['first_tokens_agree_with_hf']}/{r['batch_size']} |"
            )
    if decode:
        print("\n### Greedy decoding (full plan, EOS ignored; includes the prompt's prefill)\n")
        cols = "| batch | prompt | new | ours tok/s |" + (
            " Transformers tok/s | ours / Transformers | tokens agree |" if has_peer else ""
        )
        print(cols)
        print("|" + "---|" * (cols.count("|") - 1))
        for r in decode:
            line = f"| {r['batch_size']} | {r['prompt_len']} | {r['new_tokens']} | {r['ours_tok_s']:.1f} |"
            if has_peer:
                line += f" {r['hf_tok_s']:.1f} | {r['ours_over_hf_tok_s']:.2f} | {r['tokens_agree_with_hf']} |"
            print(line)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        default="cpu",
        help=f"preset ({', '.join(PRESETS)}; random weights), registry name or checkpoint folder",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", type=_ints, default=[32, 128, 512, 2048], help="prompt lengths N, comma separated")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 8])
    p.add_argument(
        "--max-tokens",
        type=int,
        default=1 << 62,
        help="skip (N, batch) configurations with more than batch*N prompt tokens",
    )
    p.add_argument(
        "--prune-ratio",
        type=float,
        default=None,
        help="skip the deepest floor(L*ratio) layers (default: POP's floor(L/3))",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per configuration (median reported)")
    p.add_argument(
        "--token-budget",
        type=int,
        default=None,
        help="cap repeats so repeats*batch*N stays under this (long CPU sweeps)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per configuration")
    p.add_argument(
        "--warmup-max-tokens", type=int, default=1 << 62, help="skip the per-configuration warm-up above batch*N tokens"
    )
    p.add_argument("--no-hf", action="store_true", help="do not time Transformers as a peer")
    p.add_argument("--no-decode", action="store_true", help="skip the decoding benchmark")
    p.add_argument("--decode-batch-sizes", type=_ints, default=[1, 16])
    p.add_argument("--decode-prompt-len", type=int, default=64)
    p.add_argument("--decode-new-tokens", type=int, default=64)
    p.add_argument("--decode-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="wall time (default), or process CPU time for shared CPU hosts (use with --threads 1); both land in --json",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--report", type=Path, nargs="+", default=None, help="only print the tables of saved --json results")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        for path in args.report:
            saved = json.loads(path.read_text())
            print(
                f"\n## {path.name}: {saved['source']}, {saved['dtype']} on {saved['device']}, {saved['plan_description']}"
            )
            print_report(saved["prefill"], saved["decode"], any("hf_ms" in r for r in saved["prefill"]))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    t_build = time.perf_counter()
    model, hf_config, source = build(args)
    arch = model.arch
    plan = (
        PrunePlan.from_ratio(arch.num_layers, args.prune_ratio)
        if args.prune_ratio is not None
        else PrunePlan.default(arch.num_layers)
    )
    # Contiguous copies for the peer: Transformers timed in its own layout, not our fused views.
    peer = None if args.no_hf else transformers_peer(model, hf_config, contiguous=True)
    hw = hardware()
    print(
        f"model: {source}; {arch.family}, {arch.num_layers} layers, hidden {arch.hidden_size}, "
        f"{arch.num_heads}/{arch.num_kv_heads} heads, {args.dtype} on {args.device} (built in {time.perf_counter() - t_build:.1f}s)"
    )
    print(f"plan: {plan.describe()}; clock: {args.clock}")
    print(
        f"hardware: {hw.get('gpu') or hw.get('cpu')}, {hw.get('cpu_count')} CPUs, torch {hw['torch']} ({hw['torch_threads']} threads), CPU GEMMs: {hw['cpu_blas']}"
    )
    result = {
        "model": args.model,
        "source": source,
        "arch": arch.model_dump(mode="json"),
        "plan": plan.model_dump(),
        "plan_description": plan.describe(),
        "dtype": args.dtype,
        "device": args.device,
        "hardware": hw,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "complete": False,
        "prefill": [],
        "decode": [],
    }

    def save(prefill_rows: list[dict] | None = None) -> None:
        if prefill_rows is not None:
            result["prefill"] = prefill_rows
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")

    vocab = arch.vocab_size
    result["prefill"] = bench_prefill(args, model, peer, plan, vocab, on_row=save)
    if not args.no_decode:
        result["decode"] = bench_decode(args, model, peer, vocab)
    result["complete"] = True
    save()
    print_report(result["prefill"], result["decode"], peer is not None)
    if args.json:
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
