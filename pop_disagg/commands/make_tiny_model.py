"""``pop-disagg make-tiny-model``: write a small random checkpoint of a supported family."""

from __future__ import annotations


def register(sub) -> None:
    from ..models.tiny import ARCHS

    p = sub.add_parser("make-tiny-model", help="write a tiny random checkpoint with a working tokenizer")
    p.add_argument("out", help="output folder")
    p.add_argument("--arch", default="llama", choices=ARCHS)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..models.tiny import make_tiny_model

    path = make_tiny_model(args.out, args.arch, seed=args.seed)
    print(f"wrote tiny {args.arch} checkpoint to {path}")
    return 0
