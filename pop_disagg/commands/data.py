"""``pop-disagg data prepare bigbench``: evaluation data too large to ship in a package, fetched once
into the cache (see ``pop_disagg/eval/bigbench_data.py``)."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser("data", help="prepare evaluation data in the local cache")
    actions = p.add_subparsers(dest="action", required=True)
    prep = actions.add_parser("prepare", help="fetch and extract a data set (done once)")
    prep.add_argument(
        "dataset", choices=["bigbench"], help="bigbench: the task JSONs `pop-disagg eval fidelity` scores"
    )
    prep.add_argument(
        "--tasks", default=None, help="comma-separated BIG-bench task folders (default: the ones eval fidelity uses)"
    )
    prep.add_argument(
        "--index-url", default=None, help="package index to fetch the sdist from (default: $PIP_INDEX_URL, else PyPI)"
    )
    prep.add_argument("--sdist", default=None, help="a local bigbench-1.0.0 sdist instead of downloading one")
    prep.add_argument("--force", action="store_true", help="extract again even if the tasks are prepared")
    prep.add_argument("--no-progress", action="store_true")
    prep.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    from ..eval.bigbench_data import prepare_bigbench
    from ..eval.data import BIGBENCH_TASKS

    tasks = tuple(t for t in args.tasks.split(",") if t) if args.tasks is not None else BIGBENCH_TASKS
    folder, changed = prepare_bigbench(
        tasks, args.index_url, args.sdist, progress=not args.no_progress, force=args.force
    )
    state = "prepared" if changed else "already prepared"
    print(f"[pop-disagg] BIG-bench tasks {', '.join(tasks)} {state} in {folder}", file=sys.stderr)
    print(folder)
    return 0
