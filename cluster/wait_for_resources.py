"""Wait until the Ray cluster holds enough of a resource (the head command's gate before serving).

    python wait_for_resources.py --resource GPU --count 8 --timeout 1800 [--address auto]

Polls ``ray.cluster_resources()`` (what the joined nodes hold, busy or not) and exits 0 once it
reaches ``--count``, or 1 after ``--timeout`` seconds with what the cluster has, so the serve that
follows never starts on a half-joined cluster and never waits without bound.
"""

from __future__ import annotations

import argparse
import sys
import time


def wait_for(resource: str, count: float, timeout_s: float, poll_s: float = 5.0, say=print) -> bool:
    """True once the connected cluster holds ``count`` of ``resource``; False after ``timeout_s``."""
    import ray

    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        have = ray.cluster_resources().get(resource, 0.0)
        if have >= count:
            say(f"cluster has {have:g} {resource} (asked for {count:g})")
            return True
        if have != last:
            say(f"waiting for {count:g} {resource}: {have:g} so far")
            last = have
        if time.monotonic() >= deadline:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            say(f"timed out after {timeout_s:g}s: {have:g} of {count:g} {resource} on {len(nodes)} node(s)")
            return False
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resource", default="GPU")
    p.add_argument("--count", type=float, required=True)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds")
    p.add_argument("--address", default="auto", help="Ray cluster address")
    args = p.parse_args(argv)
    import ray

    ray.init(address=args.address, log_to_driver=False)
    try:
        return (
            0
            if wait_for(
                args.resource, args.count, args.timeout, say=lambda m: print(f"[wait_for_resources] {m}", flush=True)
            )
            else 1
        )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
