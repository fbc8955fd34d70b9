"""Arguments shared by the commands: model, dtype, device, prune plan; the engine's step batching and
prefix cache; the sampling flags of one request (written once, so ``generate``, ``client`` and
``bench`` agree)."""

from __future__ import annotations

import argparse

from ..config import EngineConfig, PruneConfig


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="registry name (smollm2-135m-instruct, gemma-3-270m) or checkpoint folder",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        help="run the decode step eagerly (no CUDA graphs on GPU; vLLM's flag). CPU decode is eager unless --compile-decode",
    )
    p.add_argument(
        "--compile-decode",
        action="store_true",
        help="torch.compile batch-1 decode steps on CPU (per context bucket, at first use; ~2.5 min each on 2 cores)",
    )
    p.add_argument(
        "--cpu-blas",
        default="auto",
        choices=["auto", "torch", "openblas", "onednn"],
        help="who runs float32 GEMMs of 2+ rows on CPU: oneDNN on weights prepacked at load, torch's MKL or numpy's OpenBLAS (auto: oneDNN where torch has it, else OpenBLAS on AMD CPUs)",
    )


def add_batching_args(p: argparse.ArgumentParser) -> None:
    """Step batching and the prefix cache of the engine (``generate``, ``serve``), vLLM's flag names."""
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=8192,
        help="prompt tokens per prefill step; with --enable-chunked-prefill, tokens per step (decode + prompt chunks)",
    )
    p.add_argument(
        "--enable-chunked-prefill",
        action="store_true",
        help="mix decode tokens and prompt chunks in one step, so decoding never waits behind a whole prompt (a disaggregated prefill worker chunks long prompts)",
    )
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse cached full KV blocks of an equal prompt prefix prefilled under the same plan (vLLM's flag, on by default)",
    )


# flag -> argparse keywords; names and defaults match SamplingParams and the gRPC GenerateRequest.
_SAMPLING_FLAGS = {
    "max_new_tokens": dict(type=int, default=64, help="tokens to generate at most"),
    "temperature": dict(type=float, default=0.0, help="0 = greedy"),
    "top_k": dict(type=int, default=0, help="0 = all tokens"),
    "top_p": dict(type=float, default=1.0),
    "seed": dict(type=int, default=None, help="per-request sampling seed"),
    "stop": dict(action="append", default=[], help="stop string (repeatable)"),
    "ignore_eos": dict(action="store_true", help="generate exactly max_new_tokens (do not stop at EOS)"),
}


def add_sampling_args(p, names: tuple[str, ...] = tuple(_SAMPLING_FLAGS)) -> None:
    """Add the sampling flags ``names`` (all by default) to parser or group ``p``."""
    for name in names:
        p.add_argument("--" + name.replace("_", "-"), **_SAMPLING_FLAGS[name])


def sampling_fields(args: argparse.Namespace) -> dict:
    """The sampling flags' values as keyword arguments of SamplingParams / GenerateRequest."""
    return {name: getattr(args, name) for name in _SAMPLING_FLAGS if hasattr(args, name)}


def add_prune_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prune-ratio", type=float, help="skip the deepest floor(L*R) layers in prefill")
    g.add_argument(
        "--skip-layers",
        type=lambda s: tuple(int(x) for x in s.split(",") if x),
        help="explicit layers to skip, e.g. 20,21,22",
    )
    g.add_argument("--prune-plan", help="plan.json from `pop-disagg plan`")
    g.add_argument("--no-prune", action="store_true", help="full prefill (no POP)")


def prune_config(args: argparse.Namespace) -> PruneConfig:
    return PruneConfig(
        ratio=getattr(args, "prune_ratio", None),
        skip_layers=getattr(args, "skip_layers", None),
        plan_file=getattr(args, "prune_plan", None),
        no_prune=getattr(args, "no_prune", False),
    )


def engine_config(args: argparse.Namespace, **extra) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        prune=prune_config(args),
        enforce_eager=getattr(args, "enforce_eager", False),
        compile_decode_on_cpu=getattr(args, "compile_decode", False),
        cpu_blas=getattr(args, "cpu_blas", "auto"),
        max_num_batched_tokens=getattr(args, "max_num_batched_tokens", 8192),
        enable_chunked_prefill=getattr(args, "enable_chunked_prefill", False),
        enable_prefix_caching=getattr(args, "enable_prefix_caching", True),
        **extra,
    )
