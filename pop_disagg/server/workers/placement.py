"""Where the workers run: one placement-group bundle per worker, planned here, reserved in Ray.

Two halves. The planning half is plain Python (no Ray), unit-tested on node lists: ``plan``
takes the cluster's nodes with their total resources, the number of prefill and decode workers and
the one bundle every worker needs (``{"GPU": 1, "CPU": c}`` on GPUs, ``{"CPU": c}`` on CPU), and
returns a node per worker, or raises ``PlacementError`` naming what was asked and what the cluster
has. The Ray half (``reserve``) turns the plan into one placement group, waits for it at most
``timeout_s``, and hands out the actor options per worker (``Placement.options``).

Strategies (``--placement``):

- ``pack`` (default): as few nodes as possible, biggest first, filled in the order
  ``p0, d0, p1, d1, ...`` so a prefill worker sits on the node of the decode worker next to it: on
  a p4d such a pair's KV moves over NVLink/NVSwitch (the router still picks workers by load, so a
  request may use a pair that spans nodes).
- ``spread``: a node holds prefill workers or decode workers, never both: every transfer crosses
  the network, and each role has its nodes (memory, PCIe, NICs) to itself. Within a role the
  workers go to the node with the most room left (colocated engines: over all nodes).

Bundles are pinned to their planned nodes with Ray's ``ray.io/node-id`` label selector. When the
nodes present cannot hold the request (an autoscaling cluster that is still growing), the group is
submitted unpinned with Ray's own PACK / SPREAD, which the autoscaler can act on; either way a group
that is not ready within ``timeout_s`` is removed and start-up fails with the message. The plan
uses the nodes' totals: resources other jobs hold show up as a group that is not ready in time.

Bundle index = the worker's rank: prefill ``0..P-1``, decode ``P..P+D-1`` (as in ``deploy.py``).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Literal

from ...config import PlacementConfig, Strategy

log = logging.getLogger("pop_disagg.serve")

NODE_ID_LABEL = "ray.io/node-id"  # set by Ray on every node
_EPS = 1e-9  # Ray resources are fixed-point (1e-4); fractional bundles must not fail on rounding


class PlacementError(RuntimeError):
    """The cluster cannot hold the workers asked for (now, or within the timeout)."""


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    resources: dict[str, float]  # totals: CPU, GPU, memory, custom resources


@dataclass(frozen=True)
class WorkerLocation:
    """Where one worker actor runs, as it reports itself (``_Shell.where``)."""

    role: Literal["prefill", "decode"]
    index: int  # within its role
    node_id: str
    node_ip: str
    gpu_ids: tuple[int, ...] = ()  # physical GPU indices on the node Ray assigned; () on CPU
    owns_gpu: bool = False  # a whole GPU of its own (not a fraction shared with another worker)

    @property
    def device(self) -> str:
        return f"cuda:{self.gpu_ids[0]}" if self.gpu_ids else "cpu"


def pair_backend(a: WorkerLocation, b: WorkerLocation) -> str:
    """NCCL when both ends hold a GPU of their own (same node or not), gloo otherwise."""
    return "nccl" if a.owns_gpu and b.owns_gpu else "gloo"


# ---------------------------------------------------------------------------------------------
# Planning (pure)


def _num_fits(free: dict[str, float], bundle: dict[str, float]) -> int:
    """How many copies of ``bundle`` fit into ``free``."""
    return min(int((free.get(k, 0.0) + _EPS) // v) for k, v in bundle.items())


def _take(free: dict[str, float], bundle: dict[str, float]) -> None:
    for k, v in bundle.items():
        free[k] = free.get(k, 0.0) - v


def _fmt(resources: dict[str, float], keys) -> str:
    return "{" + ", ".join(f"{k}: {resources.get(k, 0):g}" for k in keys) + "}"


def describe_request(num_prefill: int, num_decode: int, bundle: dict[str, float], strategy: str) -> str:
    roles = f"{num_prefill} prefill + {num_decode} decode workers" if num_prefill else f"{num_decode} workers"
    return f"{roles} of {_fmt(bundle, sorted(bundle))} each ({strategy})"


def describe_cluster(nodes: list[NodeInfo], keys) -> str:
    """'1 node {CPU: 8, GPU: 0}, 2 nodes {CPU: 96, GPU: 8}': identical nodes grouped."""
    if not nodes:
        return "no nodes"
    keys = sorted(keys)
    counts = Counter(_fmt(n.resources, keys) for n in nodes)
    return ", ".join(f"{c} node{'s' if c > 1 else ''} {r}" for r, c in counts.items())


def _interleaved(num_prefill: int, num_decode: int) -> list[int]:
    """Ranks in the order p0, d0, p1, d1, ...: consecutive workers form the pairs that talk."""
    order = []
    for i in range(max(num_prefill, num_decode)):
        if i < num_prefill:
            order.append(i)
        if i < num_decode:
            order.append(num_prefill + i)
    return order


def plan(
    nodes: list[NodeInfo], num_prefill: int, num_decode: int, bundle: dict[str, float], strategy: Strategy
) -> list[str]:
    """A node id per worker rank (prefill ``0..P-1``, decode ``P..P+D-1``); ``PlacementError``
    naming the request and the cluster when the nodes cannot hold it."""
    if num_decode < 1 or num_prefill < 0:
        raise ValueError("placement needs at least one decode worker")
    num_workers = num_prefill + num_decode
    caps = [_num_fits(n.resources, bundle) for n in nodes]

    def refuse(why: str) -> PlacementError:
        return PlacementError(
            f"cannot place {describe_request(num_prefill, num_decode, bundle, strategy)}: {why}; the cluster has {describe_cluster(nodes, bundle)}"
        )

    if sum(caps) < num_workers:
        raise refuse(f"room for {sum(caps)} such worker{'s' if sum(caps) != 1 else ''}")
    if strategy == "pack":
        return _pack(nodes, caps, num_prefill, num_decode)
    if strategy == "spread":
        # Colocated engines have no roles to keep apart: they only spread over the nodes.
        split = _split(caps, num_prefill, num_decode) if num_prefill else [False] * len(nodes)
        if split is None:
            raise refuse(
                "spread keeps prefill and decode workers on different nodes, and no split of the nodes holds both roles"
            )
        return _spread(nodes, caps, split, num_prefill, num_decode)
    raise ValueError(f"placement strategy: {strategy!r} (pack or spread)")


def _pack(nodes: list[NodeInfo], caps: list[int], num_prefill: int, num_decode: int) -> list[str]:
    # Identical bundles: filling the roomiest nodes first uses the fewest nodes.
    order = sorted(range(len(nodes)), key=lambda i: -caps[i])  # stable: ties keep Ray's order
    assigned: list[str] = [""] * (num_prefill + num_decode)
    slots = iter(i for i in order for _ in range(caps[i]))
    for rank in _interleaved(num_prefill, num_decode):
        assigned[rank] = nodes[next(slots)].node_id
    return assigned


def _split(caps: list[int], num_prefill: int, num_decode: int) -> list[bool] | None:
    """Which nodes are prefill nodes: a subset with room for the prefill workers whose complement
    has room for the decode workers (subset sum over capacities, smallest prefill share first)."""
    total = sum(caps)
    # reach[s] = (node, previous sum) that first reached prefill capacity s
    reach: dict[int, tuple[int, int] | None] = {0: None}
    for i, cap in enumerate(caps):
        if cap == 0:
            continue
        for s in sorted(reach, reverse=True):
            if s + cap not in reach:
                reach[s + cap] = (i, s)
    feasible = [s for s in reach if s >= num_prefill and total - s >= num_decode]
    if not feasible:
        return None
    is_prefill = [False] * len(caps)
    s = min(feasible)
    while reach[s] is not None:
        i, s = reach[s]
        is_prefill[i] = True
    return is_prefill


def _spread(
    nodes: list[NodeInfo], caps: list[int], is_prefill: list[bool], num_prefill: int, num_decode: int
) -> list[str]:
    left = list(caps)
    assigned: list[str] = [""] * (num_prefill + num_decode)
    for rank in _interleaved(num_prefill, num_decode):
        role_is_prefill = rank < num_prefill
        candidates = [i for i in range(len(nodes)) if is_prefill[i] == role_is_prefill and left[i] > 0]
        best = max(candidates, key=lambda i: left[i])  # first of the roomiest: balances the role
        left[best] -= 1
        assigned[rank] = nodes[best].node_id
    return assigned


# CPU workers reserve only a token by default, as the actors did before placement groups (num_cpus=0):
# several servers (tests, benchmarks) share one small Ray instance, and Ray's CPU is bookkeeping,
# not pinning. ``--cpus-per-worker`` reserves real cores.
TOKEN_CPUS = 0.01


def default_cpus(total_cpus: float, num_workers: int) -> float:
    """GPU workers: 1 CPU each, or an equal share when the cluster has fewer CPUs than workers."""
    return max(TOKEN_CPUS, min(1.0, math.floor(total_cpus / num_workers * 100) / 100))


def gpus_per_worker(total_gpus: float, num_workers: int) -> float:
    """A whole GPU each when there are enough; otherwise workers share (KV over gloo)."""
    if total_gpus >= num_workers:
        return 1.0
    return 1.0 / math.ceil(num_workers / total_gpus)


# ---------------------------------------------------------------------------------------------
# Ray


@dataclass
class Placement:
    """A ready placement group: bundle ``rank`` is worker ``rank``'s reservation."""

    group: object  # ray.util.placement_group.PlacementGroup
    bundle: dict[str, float]
    num_prefill: int
    num_decode: int

    @property
    def owns_gpu(self) -> bool:
        return self.bundle.get("GPU", 0.0) >= 1.0

    def options(self, rank: int) -> dict:
        """``ActorClass.options(**placement.options(rank))`` for worker ``rank``."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {
            "num_cpus": self.bundle["CPU"],
            "num_gpus": self.bundle.get("GPU", 0),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=rank),
        }

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        if self.group is not None:
            try:
                remove_placement_group(self.group)
            except Exception as exc:  # Ray already gone: nothing left to free
                log.warning("placement group removal: %s", exc)
            self.group = None


def cluster_nodes() -> list[NodeInfo]:
    """The alive nodes of the connected Ray cluster with their total resources."""
    import ray

    return [NodeInfo(n["NodeID"], dict(n["Resources"])) for n in ray.nodes() if n.get("Alive")]


def bundle_for(config: PlacementConfig, device: str, nodes: list[NodeInfo], num_workers: int) -> dict[str, float]:
    total_cpus = sum(n.resources.get("CPU", 0.0) for n in nodes)
    bundle = {
        "CPU": config.cpus_per_worker or (default_cpus(total_cpus, num_workers) if device == "cuda" else TOKEN_CPUS)
    }
    if device == "cuda":
        total_gpus = sum(n.resources.get("GPU", 0.0) for n in nodes)
        if total_gpus == 0:
            raise PlacementError(
                f"--device cuda but the Ray cluster has no GPUs ({describe_cluster(nodes, ['CPU', 'GPU'])})"
            )
        bundle["GPU"] = gpus_per_worker(total_gpus, num_workers)
        if bundle["GPU"] < 1:
            log.warning("%d workers share %g GPUs: KV moves over gloo", num_workers, total_gpus)
    return bundle


def reserve(config: PlacementConfig, num_prefill: int, num_decode: int, device: str) -> Placement:
    """Plan against the cluster's nodes, create the placement group and wait until it is ready."""
    import ray
    from ray.exceptions import GetTimeoutError
    from ray.util.placement_group import placement_group, remove_placement_group

    nodes = cluster_nodes()
    num_workers = num_prefill + num_decode
    bundle = bundle_for(config, device, nodes, num_workers)
    bundles = [dict(bundle) for _ in range(num_workers)]
    ray_strategy = {"pack": "PACK", "spread": "SPREAD"}[config.strategy]
    try:
        node_ids = plan(nodes, num_prefill, num_decode, bundle, config.strategy)
    except PlacementError as exc:
        log.warning("%s; waiting up to %gs for more nodes", exc, config.timeout_s)
        group = placement_group(bundles, strategy=ray_strategy)  # the autoscaler sees this demand
    else:
        try:
            group = placement_group(
                bundles, strategy=ray_strategy, bundle_label_selector=[{NODE_ID_LABEL: n} for n in node_ids]
            )
        except TypeError:  # a Ray without per-bundle label selectors: its own PACK/SPREAD decides
            log.warning("this Ray cannot pin bundles to nodes; placing with Ray's %s", ray_strategy)
            group = placement_group(bundles, strategy=ray_strategy)
    try:
        ray.get(group.ready(), timeout=config.timeout_s)
    except GetTimeoutError:
        remove_placement_group(group)
        asked = describe_request(num_prefill, num_decode, bundle, config.strategy)
        raise PlacementError(
            f"placement group for {asked} not ready within {config.timeout_s:g}s (--placement-timeout); "
            f"the cluster has {describe_cluster(cluster_nodes(), bundle)}"
        ) from None
    log.info("placement: %s", describe_request(num_prefill, num_decode, bundle, config.strategy))
    return Placement(group, bundle, num_prefill, num_decode)


def worker_locations(prefill: list, decode: list, placement: Placement) -> list[WorkerLocation]:
    """Ask each actor where it runs (prefill first, then decode: rank order)."""
    import ray

    reports = ray.get([a.where.remote() for a in prefill + decode], timeout=60)
    locations = []
    for rank, r in enumerate(reports):
        role, index = ("prefill", rank) if rank < len(prefill) else ("decode", rank - len(prefill))
        locations.append(
            WorkerLocation(
                role, index, r["node_id"], r["node_ip"], tuple(r["gpu_ids"]), placement.owns_gpu and bool(r["gpu_ids"])
            )
        )
    return locations
