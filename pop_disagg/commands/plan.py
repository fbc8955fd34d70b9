"""``pop-disagg plan``: turn an importance profile into a prune plan (``plan.json``) that
``generate --prune-plan`` and the servers run with."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    from ..pop.plan import STRATEGIES

    p = sub.add_parser("plan", help="prune plan from an importance profile -> plan.json")
    p.add_argument("--profile", required=True, help="profile.json from `pop-disagg calibrate`")
    p.add_argument("--ratio", type=float, default=1 / 3, help="fraction of layers skipped in prefill (default 1/3: floor(L/3) layers)")
    p.add_argument("--strategy", default="last", choices=STRATEGIES, help="last: the deepest layers (POP); importance: the lowest prefill importance")
    p.add_argument("--out", required=True, help="plan.json to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..calib.importance import ImportanceProfile, plan_from_profile

    profile = ImportanceProfile.load(args.profile)
    plan = plan_from_profile(profile, args.ratio, args.strategy)
    plan.save(args.out)
    print(f"[plan] {plan.describe()} -> {args.out}", file=sys.stderr)
    return 0
