"""``pop-disagg eval fidelity``: POP's quality cost against the full model, ablations and static
pruning, written as JSON + Markdown + PNG plots (see ``pop_disagg/eval/fidelity.py``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _ratios(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(",") if x)


def register(sub) -> None:
    from ..eval.data import BIGBENCH_TASKS

    p = sub.add_parser("eval", help="quality evaluations of POP")
    evals = p.add_subparsers(dest="eval_command", required=True)
    f = evals.add_parser(
        "fidelity", help="POP vs full model, ablations and static pruning (perplexity, KL, agreement, BIG-bench MC)"
    )
    f.add_argument("--model", default="smollm2-135m-instruct", help="registry name or checkpoint folder")
    f.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    f.add_argument(
        "--prune-plan",
        help="plan.json (e.g. from `pop-disagg plan`): evaluated as pop-plan and used as the ablations' reference",
    )
    f.add_argument("--num-texts", type=int, default=24, help="texts (half Britannica prose, half ShareGPT answers)")
    f.add_argument(
        "--text-file", help="own evaluation texts (blank-line-separated paragraphs) instead of Britannica + ShareGPT"
    )
    f.add_argument(
        "--image-file",
        help="a vision-language model's image + text samples instead of the texts: JSONL of chat messages with data-URL images (what `calibrate` takes); a closing assistant message is the scored answer, else the full model's greedy one",
    )
    f.add_argument(
        "--max-image-prompt-tokens",
        type=int,
        default=4096,
        help="image samples whose prompt (with its image tokens) is longer are skipped",
    )
    f.add_argument("--prompt-len", type=int, default=128)
    f.add_argument("--continuation-len", type=int, default=64)
    f.add_argument("--greedy-len", type=int, default=32)
    f.add_argument(
        "--tasks",
        default=",".join(BIGBENCH_TASKS),
        help="BIG-bench JSON tasks (comma-separated; empty for none; `pop-disagg data prepare bigbench` fetches them)",
    )
    f.add_argument("--num-choice-examples", type=int, default=40, help="examples per BIG-bench task")
    f.add_argument(
        "--ratios", type=_ratios, default=None, help="POP prune ratios (default: the paper's 0.2,0.25,1/3,0.4,0.5,0.6)"
    )
    f.add_argument(
        "--kv-fit-ratios",
        type=_ratios,
        default=None,
        help="ratios that also get the least-squares K/V correction (default 1/3,0.5; empty for none)",
    )
    f.add_argument(
        "--static-ratios",
        type=_ratios,
        default=None,
        help="ratios that get a FLOPs-matched static (Block Influence) baseline (default 1/3)",
    )
    f.add_argument(
        "--num-calib-texts",
        type=int,
        default=32,
        help="calibration texts (256 tokens each) for Block Influence and the K/V fit",
    )
    f.add_argument(
        "--kv-correction-method",
        default=None,
        choices=["kv", "state"],
        help="how the +kvfit methods fit skipped layers' K/V: kv = K/V after the norm, state = each layer's pre-norm input, then its own norm and K/V (default: see pop_disagg/calib/kv_correction.py)",
    )
    f.add_argument(
        "--kv-fit-variants",
        default="",
        help="extra refit variants per --kv-fit-ratios, e.g. state,kv-chat,kv-4x (<method>[-chat|-prose][-<N>x])",
    )
    f.add_argument("--only", help="comma-separated method names to run (besides full)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); 1 is steadier on a shared machine",
    )
    f.add_argument("--output", required=True, help="results JSON; the .md table and the plots go beside it")
    f.add_argument("--no-plots", action="store_true")
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(func=run_fidelity_command)

    h = evals.add_parser(
        "lm-eval", help="lm-evaluation-harness tasks on the `pop-disagg` model type (needs the 'eval' extra)"
    )
    h.add_argument(
        "--model-args",
        default="model=smollm2-135m-instruct",
        help="e.g. model=gemma-3-270m,prune_ratio=0.5 (keys: see pop_disagg/eval/lm_eval_adapter.py)",
    )
    h.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    h.add_argument("--include-path", help="folder of local task YAMLs")
    h.add_argument("--no-default-tasks", action="store_true", help="index only --include-path (much faster start)")
    h.add_argument("--limit", type=int, default=None, help="examples per task")
    h.add_argument("--batch-size", type=int, default=8)
    h.add_argument("--output", help="write the harness's results JSON here")
    h.set_defaults(func=run_lm_eval_command)


def _config(args: argparse.Namespace):
    from ..eval.fidelity import FidelityConfig

    kw = dict(
        model=args.model,
        dtype=args.dtype,
        num_texts=args.num_texts,
        prompt_len=args.prompt_len,
        continuation_len=args.continuation_len,
        greedy_len=args.greedy_len,
        tasks=tuple(t for t in args.tasks.split(",") if t),
        num_choice_examples=args.num_choice_examples,
        plan_file=args.prune_plan,
        text_file=args.text_file,
        image_file=args.image_file,
        max_image_prompt_tokens=args.max_image_prompt_tokens,
        num_calib_texts=args.num_calib_texts,
        seed=args.seed,
        only=tuple(args.only.split(",")) if args.only else None,
        progress=not args.no_progress,
        kv_fit_variants=tuple(v for v in args.kv_fit_variants.split(",") if v),
    )
    if args.kv_correction_method is not None:
        kw["kv_correction_method"] = args.kv_correction_method
    for key in ("ratios", "kv_fit_ratios", "static_ratios"):
        if getattr(args, key) is not None:
            kw[key] = getattr(args, key)
    return FidelityConfig(**kw)


def run_fidelity_command(args: argparse.Namespace) -> int:
    from ..calib.kv_correction import FILE_NAME as KV_FILE_NAME
    from ..eval.fidelity import run_fidelity
    from ..eval.report import markdown_report, plot_layer_curves, plot_quality_vs_ratio

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = _config(args)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    results, corrections = run_fidelity(cfg)
    # A correction lives beside the plan it was fitted for: next to --prune-plan for the plan
    # file's own, beside the results for the ratio plans.
    for name, corr in corrections.items():
        if name == "pop-plan+kvfit":
            path = corr.save(Path(args.prune_plan).parent / KV_FILE_NAME)
        else:
            path = corr.save(out.parent / f"{out.stem}.{name}.{KV_FILE_NAME}")
        results["kv_correction"][name]["file"] = str(path)
    out.write_text(json.dumps(results, indent=1) + "\n")
    md = out.with_suffix(".md")
    md.write_text(markdown_report(results))
    written = [out, md]
    if not args.no_plots:
        written.append(plot_quality_vs_ratio(results, out.with_name(out.stem + "_vs_ratio.png")))
        written.append(plot_layer_curves(results, out.with_name(out.stem + "_layers.png")))
    print(md.read_text())
    print("[pop-disagg] wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def run_lm_eval_command(args: argparse.Namespace) -> int:
    try:
        from ..eval.lm_eval_adapter import evaluate
    except ImportError as exc:
        raise RuntimeError(
            f"lm-evaluation-harness is not installed ({exc}); install with: pip install 'pop-disagg[eval]'"
        ) from None
    out = evaluate(
        args.model_args,
        [t for t in args.tasks.split(",") if t],
        args.include_path,
        args.limit,
        args.batch_size,
        include_defaults=not args.no_default_tasks,
    )
    summary = {"model_args": args.model_args, "results": out["results"]}
    text = json.dumps(summary, indent=1, default=str)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0
