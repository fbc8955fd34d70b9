"""``pop-disagg generate``: run one prompt through the single-process engine."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .common import add_batching_args, add_model_args, add_prune_args, add_sampling_args, engine_config, sampling_fields


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text with the single-process engine (POP by default)")
    add_model_args(p)
    add_batching_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument(
        "--prompt-ids", type=lambda s: [int(x) for x in s.split(",") if x], help="comma-separated token ids"
    )
    add_prune_args(p)
    p.add_argument("--chat", action="store_true", help="render the prompt with the tokenizer's chat template")
    add_sampling_args(p)
    p.add_argument(
        "--json", action="store_true", help='print {"token_ids": [...], "text": "..."} (generated tokens only)'
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..engine.engine import LLMEngine
    from ..engine.sampling import SamplingParams

    params = SamplingParams(**{**sampling_fields(args), "stop": tuple(args.stop)})
    engine = LLMEngine(engine_config(args))
    if args.prompt_ids is not None:
        ids = args.prompt_ids
    elif args.chat:
        ids = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
    else:
        ids = engine.tokenizer.encode(args.prompt)
    if not args.json:
        print(f"[pop-disagg] {engine.plan.describe()}", file=sys.stderr)
    t0 = time.perf_counter()
    out = engine.generate([list(ids)], params)[0]
    dt = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"token_ids": out.token_ids, "text": out.text}))
    else:
        print(out.text)
        print(
            f"[pop-disagg] {len(ids)} prompt tokens, {len(out.token_ids)} generated in {dt:.2f}s ({out.finish_reason})",
            file=sys.stderr,
        )
    return 0
