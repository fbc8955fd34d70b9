"""``pop-disagg calibrate``: measure stage-aware layer importance (the paper's Figure 1) on a
calibration file and write ``profile.json`` (and optionally the plot)."""

from __future__ import annotations

import argparse
import sys

from .common import add_model_args


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="stage-aware layer importance with virtual gates -> profile.json")
    add_model_args(p)
    p.add_argument(
        "--data",
        required=True,
        help="JSONL with 'prompt' or chat 'messages' per line (a VLM: content parts with data-URL images), or plain text (one prompt per line)",
    )
    p.add_argument("--num-samples", type=int, default=200, help="calibration samples (the paper uses 200)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest sampled response")
    p.add_argument("--max-prompt-tokens", type=int, default=1024, help="longer prompts keep their last tokens")
    p.add_argument("--seed", type=int, default=0, help="sample i draws its response with seed + i")
    p.add_argument(
        "--sample-batch",
        type=int,
        default=8,
        help="prompts whose responses are sampled together (gradients are always one sample at a time)",
    )
    p.add_argument("--out", required=True, help="profile.json to write")
    p.add_argument("--plot", help="also draw the profile to this image (e.g. importance.png)")
    p.add_argument("--log-scale", action="store_true", help="log-scale y axis in the plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in ("num_samples", "max_new_tokens", "max_prompt_tokens", "sample_batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    from tqdm import tqdm
    from transformers import AutoTokenizer

    from ..calib.data import encode_image_prompt, encode_prompt, image_urls, read_prompts
    from ..calib.importance import CalibrationSettings, ImportanceProfile, engine_sampler, measure_importance
    from ..models.loader import load_model
    from ..models.registry import resolve_model

    loaded = read_prompts(args.data)
    for line in loaded.skipped:
        print(f"[calibrate] skipped {line}", file=sys.stderr)
    records = loaded.records[: args.num_samples]
    if len(records) < args.num_samples:
        print(f"[calibrate] only {len(records)} usable prompts in {args.data}; using all of them", file=sys.stderr)

    path = resolve_model(args.model)
    model = load_model(path, args.dtype, args.device)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    prompts, images = [], []
    image_inputs = None
    if model.arch.vision_family is not None and any(image_urls(r) for r in records):
        from ..models.vision import ImageInputs, VisionSpec

        image_inputs = ImageInputs(path, VisionSpec.from_pretrained(path, tokenizer))
    for r in records:
        if not image_urls(r):
            prompts.append(encode_prompt(r, tokenizer, args.max_prompt_tokens))
            images.append(None)
            continue
        if image_inputs is None:
            raise ValueError(f"{args.data}:{r.line}: an image sample, but {args.model} takes no images")
        try:
            ids, ims = encode_image_prompt(r, tokenizer, image_inputs, args.max_prompt_tokens)
        except ValueError as exc:
            print(f"[calibrate] skipped {args.data}:{r.line}: {exc}", file=sys.stderr)
            continue
        prompts.append(ids)
        images.append(ims)
    if not prompts:
        raise ValueError(f"{args.data}: no usable prompts")
    sampler = engine_sampler(
        model,
        tokenizer,
        args.max_new_tokens,
        args.max_prompt_tokens,
        args.seed,
        str(path),
        args.dtype,
        args.sample_batch,
    )
    print(
        f"[calibrate] {model.arch.family}, {model.arch.num_layers} layers, {len(prompts)} samples on {args.device} ({args.dtype})",
        file=sys.stderr,
    )

    bar = tqdm(total=len(prompts), desc="calibrate", unit="sample", disable=args.no_progress, file=sys.stderr)

    def on_sample(num_response_tokens: int, loss: float) -> None:
        bar.set_postfix(resp_tokens=num_response_tokens, loss_per_tok=f"{loss / max(num_response_tokens, 1):.2f}")
        bar.update(1)

    acc, stats = measure_importance(
        model, prompts, sampler, args.sample_batch, on_sample, images if any(images) else None
    )
    bar.close()
    prefill, decode = acc.means()
    settings = CalibrationSettings(
        data=str(args.data),
        num_samples=acc.num_samples,
        max_new_tokens=args.max_new_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        seed=args.seed,
        sample_batch=args.sample_batch,
        dtype=args.dtype,
        device=args.device,
    )
    profile = ImportanceProfile(
        model=args.model, num_layers=model.arch.num_layers, settings=settings, prefill=prefill, decode=decode, **stats
    )
    profile.save(args.out)
    print(f"[calibrate] wrote {args.out} ({stats['seconds_per_sample']:.2f} s/sample)", file=sys.stderr)
    if args.plot:
        from ..calib.plot import plot_profile

        plot_profile(profile, args.plot, args.log_scale)
        print(f"[calibrate] wrote {args.plot}", file=sys.stderr)
    return 0
