"""``pop-disagg`` command line: one subcommand per module in ``pop_disagg/commands/``.

Each command module exposes ``register(subparsers)``, which adds its parser and sets ``func``.
Heavy imports (torch, ray, grpc) happen inside the commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = [
    "generate",
    "make_tiny_model",
    "calibrate",
    "plan",
    "bench",
    "models",
    "serve",
    "client",
    "demo",
    "eval",
    "data",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pop-disagg", description="Disaggregated prefill/decode serving with POP (Prefill-Only Pruning)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"pop_disagg.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from .errors import format_validation_error

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # User errors (bad plan, bad checkpoint, bad parameter) print one clear line, not a trace.
        msg = format_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
        print(f"pop-disagg {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
