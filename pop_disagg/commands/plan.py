"""``pop-disagg plan``: turn an importance profile into a prune plan (``plan.json``) that
``generate --prune-plan`` and the servers run with, or (``--ratios``) into a nested plan family
that ``serve --prune-plan family.json`` serves with a per-request depth."""

from __future__ import annotations

import argparse
import sys


def parse_ratios(text: str) -> list[float]:
    try:
        ratios = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated ratios such as 0.2,0.33,0.5, got {text!r}"
        ) from None
    if not ratios:
        raise argparse.ArgumentTypeError("give at least one ratio")
    return ratios


def register(sub) -> None:
    from ..pop.plan import STRATEGIES

    p = sub.add_parser("plan", help="prune plan (or a nested family of plans) from an importance profile -> JSON")
    p.add_argument("--profile", required=True, help="profile.json from `pop-disagg calibrate`")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--ratio",
        type=float,
        default=1 / 3,
        help="fraction of layers skipped in prefill (default 1/3: floor(L/3) layers)",
    )
    g.add_argument(
        "--ratios",
        type=parse_ratios,
        default=None,
        help="a nested family, e.g. 0.2,0.33,0.4,0.5 (the first is the served default)",
    )
    p.add_argument(
        "--strategy",
        default="last",
        choices=STRATEGIES,
        help="last: the deepest layers (POP); importance: the lowest prefill importance",
    )
    p.add_argument("--out", required=True, help="plan.json (or family.json) to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..calib.importance import ImportanceProfile, plan_from_profile
    from ..pop.plan import PlanFamily

    profile = ImportanceProfile.load(args.profile)
    if args.ratios is not None:
        # Both strategies take a prefix of one layer order (deepest first / least important first),
        # so a larger ratio's skip set always contains a smaller one's: the family is nested.
        family = PlanFamily.build(
            args.ratios,
            lambda r: plan_from_profile(profile, r, args.strategy),
            strategy=args.strategy,
            model=profile.model,
        )
        family.save(args.out)
        print(f"[plan] {family.describe()} -> {args.out}", file=sys.stderr)
        return 0
    plan = plan_from_profile(profile, args.ratio, args.strategy)
    plan.save(args.out)
    print(f"[plan] {plan.describe()} -> {args.out}", file=sys.stderr)
    return 0
