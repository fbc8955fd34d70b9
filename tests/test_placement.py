"""Placement planning on node lists (no Ray): pack, spread, the refusals and their message."""

from __future__ import annotations

from collections import Counter

import pytest

from pop_disagg.config import PlacementConfig
from pop_disagg.server.workers.placement import (
    TOKEN_CPUS,
    NodeInfo,
    PlacementError,
    WorkerLocation,
    bundle_for,
    default_cpus,
    gpus_per_worker,
    pair_backend,
    plan,
)

GPU = {"GPU": 1.0, "CPU": 1.0}
CPU = {"CPU": 1.0}


def p4d(name: str) -> NodeInfo:
    return NodeInfo(name, {"CPU": 96.0, "GPU": 8.0, "memory": 1e12})


def cpu_head() -> NodeInfo:
    return NodeInfo("head", {"CPU": 8.0, "memory": 3e10})


def roles(nodes_of_rank: list[str], num_prefill: int) -> dict[str, set[str]]:
    """node -> the roles it holds."""
    out: dict[str, set[str]] = {}
    for rank, node in enumerate(nodes_of_rank):
        out.setdefault(node, set()).add("prefill" if rank < num_prefill else "decode")
    return out


def test_pack_puts_pairs_on_one_gpu_node_and_skips_the_cpu_head():
    nodes = [cpu_head(), p4d("a"), p4d("b")]
    assert plan(nodes, 1, 1, GPU, "pack") == ["a", "a"]
    assert plan(nodes, 2, 1, GPU, "pack") == ["a", "a", "a"]
    # 5 pairs = 10 GPUs: the first node is filled with p0 d0 .. p3 d3, the fifth pair goes to b.
    got = plan(nodes, 5, 5, GPU, "pack")
    assert got[:4] == ["a"] * 4 and got[5:9] == ["a"] * 4  # prefill 0-3 and decode 0-3 together
    assert got[4] == got[9] == "b"  # the fifth pair shares b


def test_pack_fills_the_roomiest_node_first():
    nodes = [NodeInfo("small", {"CPU": 1.0}), NodeInfo("big", {"CPU": 3.0})]
    assert plan(nodes, 2, 1, CPU, "pack") == ["big", "big", "big"]
    assert Counter(plan(nodes, 2, 2, CPU, "pack")) == {"big": 3, "small": 1}


def test_spread_keeps_roles_on_different_nodes():
    nodes = [cpu_head(), p4d("a"), p4d("b")]
    got = plan(nodes, 1, 1, GPU, "spread")
    assert got[0] != got[1] and "head" not in got
    got = plan(nodes, 4, 4, GPU, "spread")
    assert all(len(r) == 1 for r in roles(got, 4).values())
    assert Counter(got) == {"a": 4, "b": 4}


def test_spread_finds_the_split_a_greedy_choice_misses():
    # The roomiest node first would give prefill the 2-slot node and leave one slot for 2 decoders.
    nodes = [NodeInfo("one", {"CPU": 1.0}), NodeInfo("two", {"CPU": 2.0})]
    assert plan(nodes, 1, 2, CPU, "spread") == ["one", "two", "two"]
    assert plan(nodes, 2, 1, CPU, "spread") == ["two", "two", "one"]


def test_spread_balances_a_role_over_its_nodes():
    nodes = [NodeInfo(n, {"CPU": 4.0}) for n in "abc"]
    got = plan(nodes, 1, 4, CPU, "spread")
    by_role = roles(got, 1)
    decode_nodes = [n for n, r in by_role.items() if r == {"decode"}]
    assert len(decode_nodes) == 2 and Counter(got[1:]) == {n: 2 for n in decode_nodes}


def test_colocated_spread_uses_every_node():
    nodes = [NodeInfo(n, {"CPU": 4.0}) for n in "abc"]
    assert sorted(plan(nodes, 0, 3, CPU, "spread")) == ["a", "b", "c"]
    assert plan(nodes, 0, 3, CPU, "pack") == ["a", "a", "a"]


def test_refusal_names_the_request_and_the_cluster():
    nodes = [cpu_head(), p4d("a")]
    with pytest.raises(PlacementError) as err:
        plan(nodes, 5, 5, GPU, "pack")
    msg = str(err.value)
    assert "5 prefill + 5 decode workers of {CPU: 1, GPU: 1} each (pack)" in msg
    assert "room for 8 such workers" in msg
    assert "1 node {CPU: 8, GPU: 0}, 1 node {CPU: 96, GPU: 8}" in msg


def test_spread_refuses_a_single_node_with_room_for_everything():
    nodes = [cpu_head(), p4d("a")]
    assert plan(nodes, 1, 1, GPU, "pack") == ["a", "a"]
    with pytest.raises(
        PlacementError, match=r"spread keeps prefill and decode workers on different nodes.*1 node \{CPU: 96, GPU: 8\}"
    ):
        plan(nodes, 1, 1, GPU, "spread")


def test_identical_nodes_are_grouped_in_the_message():
    nodes = [NodeInfo(n, {"CPU": 2.0}) for n in "abc"]
    with pytest.raises(PlacementError, match=r"3 nodes \{CPU: 2\}$"):
        plan(nodes, 4, 3, CPU, "pack")


def test_fractional_bundles_fit_without_rounding_loss():
    nodes = [NodeInfo("n", {"CPU": 2.0})]
    share = default_cpus(2.0, 3)
    assert share == 0.66
    assert plan(nodes, 2, 1, {"CPU": share}, "pack") == ["n"] * 3
    assert plan(nodes, 0, 3, {"CPU": 2 / 3}, "pack") == ["n"] * 3  # 3 x (2/3) == 2 despite floats


def test_bundle_defaults():
    two = [NodeInfo("a", {"CPU": 1.0, "GPU": 1.0}), NodeInfo("b", {"CPU": 1.0, "GPU": 1.0})]
    assert bundle_for(PlacementConfig(), "cuda", two, 2) == {"CPU": 1.0, "GPU": 1.0}
    assert bundle_for(PlacementConfig(), "cuda", two, 3) == {"CPU": 0.66, "GPU": 0.5}  # share: gloo
    assert bundle_for(PlacementConfig(cpus_per_worker=4), "cpu", two, 2) == {"CPU": 4.0}
    assert bundle_for(PlacementConfig(), "cpu", two, 2) == {"CPU": TOKEN_CPUS}  # servers share small Rays
    assert gpus_per_worker(8, 3) == 1.0 and gpus_per_worker(1, 3) == 1 / 3
    with pytest.raises(PlacementError, match="no GPUs"):
        bundle_for(PlacementConfig(), "cuda", [cpu_head()], 2)


def test_nccl_only_between_workers_owning_a_gpu():
    gpu_a = WorkerLocation("prefill", 0, "a", "10.0.0.1", (3,), owns_gpu=True)
    gpu_b = WorkerLocation("decode", 0, "b", "10.0.0.2", (0,), owns_gpu=True)
    shared = WorkerLocation("decode", 1, "a", "10.0.0.1", (3,), owns_gpu=False)
    cpu = WorkerLocation("decode", 2, "a", "10.0.0.1")
    assert pair_backend(gpu_a, gpu_b) == "nccl"
    assert pair_backend(gpu_a, shared) == pair_backend(gpu_a, cpu) == "gloo"
    assert gpu_a.device == "cuda:3" and cpu.device == "cpu"


def test_config_rejects_unknown_strategy():
    with pytest.raises(ValueError):
        PlacementConfig(strategy="scatter")
    with pytest.raises(ValueError):
        PlacementConfig(timeout_s=0)


def test_serve_flags_reach_the_placement_config():
    from pop_disagg.cli import build_parser
    from pop_disagg.commands.serve import serve_config

    args = build_parser().parse_args(
        ["serve", "--placement", "spread", "--placement-timeout", "7", "--cpus-per-worker", "2"]
    )
    assert serve_config(args).placement == PlacementConfig(strategy="spread", timeout_s=7, cpus_per_worker=2)
    assert serve_config(build_parser().parse_args(["serve"])).placement == PlacementConfig(
        strategy="pack", timeout_s=120
    )


def test_router_prefers_a_same_node_prefill_worker_only_between_equal_loads():
    """Idle (equal queues), the prefill worker on the decode worker's node takes the prompt, so its
    K/V cross no network; otherwise the least-loaded one does, wherever it runs."""
    import types

    from pop_disagg.server.control.router import least_loaded_prefill
    from pop_disagg.server.workers.deploy import Deployment

    # 2P2D: prefill 0 on node a, prefill 1 on node b; decode 0 on b, decode 1 on a.
    locs = [
        WorkerLocation("prefill", 0, "a", "10.0.0.1"),
        WorkerLocation("prefill", 1, "b", "10.0.0.2"),
        WorkerLocation("decode", 0, "b", "10.0.0.2"),
        WorkerLocation("decode", 1, "a", "10.0.0.1"),
    ]
    config = types.SimpleNamespace(num_prefill=2, is_disaggregated=True)
    dep = Deployment(config, plan=None, prefill=[], decode=[], tokenizer=None, arch=None, locations=locs)
    assert [[dep.same_node(p, d) for d in (0, 1)] for p in (0, 1)] == [[False, True], [True, False]]
    slots = [types.SimpleNamespace(index=0), types.SimpleNamespace(index=1)]
    for d, near in ((0, 1), (1, 0)):
        same = lambda p, d=d: dep.same_node(p, d)  # noqa: E731
        assert least_loaded_prefill(slots, [0, 0], same).index == near
        assert least_loaded_prefill(slots, [5, 5], same).index == near
        loads = [0, 0]
        loads[near] = 1  # the near one has one queued token more: the far one wins
        assert least_loaded_prefill(slots, loads, same).index == 1 - near
    assert not Deployment(config, plan=None, prefill=[], decode=[], tokenizer=None, arch=None).same_node(
        0, 0
    )  # locations unknown
