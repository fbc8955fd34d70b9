"""Serving on a real two-node Ray cluster (``ray.cluster_utils.Cluster``: a head and one added node).

The nodes differ so the placement is forced: the head has 1 CPU, the other node 3, and every worker
reserves 1 CPU. ``spread`` must then put the prefill worker on one node and the decode worker on the
other; ``pack`` must put 2P1D on the 3-CPU node; 4P1D does not fit and fails within the timeout.
Ray's state API (``list_actors``) says where the actors really ran; the answers must equal the
single-process engine token for token.

The cluster lives under its own ``RAY_TMPDIR``: ``Cluster`` writes the address file
``$RAY_TMPDIR/ray/ray_current_cluster`` that a plain ``ray.init()`` attaches to, and tests running
next to this one on the same machine must keep starting their own Ray. Everything started here is
stopped by ``Cluster.shutdown()``; the gRPC servers bind 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time

import grpc
import pytest
import ray
import torch
from ray._common.utils import get_ray_address_file
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from pop_disagg._proto import generation_pb2 as pb
from pop_disagg._proto import generation_pb2_grpc as pb_grpc
from pop_disagg.config import EngineConfig, PlacementConfig, ServeConfig
from pop_disagg.engine.engine import LLMEngine
from pop_disagg.engine.sampling import SamplingParams
from pop_disagg.models.loader import load_model
from pop_disagg.server.app import BackgroundServer
from pop_disagg.server.workers.placement import PlacementError

PROMPT_LENS = (2, 9, 23)
MAX_NEW = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _add_node(cluster: Cluster, attempts: int = 3, **args) -> None:
    """``cluster.add_node`` again when a raylet misses Ray's fixed 30 s registration window (a
    loaded machine); the half-started node's processes are stopped before the next attempt."""
    for attempt in range(attempts):
        try:
            cluster.add_node(**args)
            return
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == attempts - 1:
                raise
            tb = exc.__traceback__
            while tb is not None:  # the Node whose __init__ gave up
                node = tb.tb_frame.f_locals.get("self")
                if isinstance(node, ray._private.node.Node):
                    node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)
                    break
                tb = tb.tb_next


@pytest.fixture(scope="module")
def cluster():
    assert not ray.is_initialized()
    # Short path: Ray's Unix sockets live under it (108-byte limit).
    tmp = tempfile.mkdtemp(prefix="pd-mn-", dir="/tmp")
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    c = None
    try:
        # The dashboard serves the state API; its own free port, so it never collides with another Ray.
        c = Cluster()
        _add_node(c, num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=_free_port())
        _add_node(c, num_cpus=3)
        c.wait_for_nodes()
        # The address file a plain ray.init() follows is ours alone, not the machine's.
        assert get_ray_address_file(None) == os.path.join(tmp, "ray", "ray_current_cluster")
        assert open(os.path.join(tmp, "ray", "ray_current_cluster")).read().strip() == c.address
        default_file = os.path.join("/tmp", "ray", "ray_current_cluster")
        assert not os.path.exists(default_file) or open(default_file).read().strip() != c.address
        ray.init(address=c.address, log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        if c is not None:
            c.shutdown()
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        for _ in range(10):  # a Ray process still exiting may write one last file into it
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.exists(tmp):
                break
            time.sleep(0.5)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from pop_disagg.models.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("multinode-tiny"), "llama", seed=5))


@pytest.fixture(scope="module")
def nodes(cluster):
    """node id -> CPUs, for the two nodes of the cluster."""
    return {n["NodeID"]: n["Resources"]["CPU"] for n in ray.nodes() if n["Alive"]}


def _config(path, num_prefill, strategy, timeout_s=60.0):
    engine = EngineConfig(model=path, kv_cache_memory_mb=2, block_size=4, max_model_len=128)
    placement = PlacementConfig(strategy=strategy, timeout_s=timeout_s, cpus_per_worker=1)
    return ServeConfig(engine=engine, num_prefill=num_prefill, transfer_timeout_s=20, placement=placement)


def _prompts():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, 200, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _check_equals_engine(server: BackgroundServer, path) -> None:
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    engine = LLMEngine(server.server.config.worker_engine, model=load_model(path), model_path=path)
    ref = engine.generate(_prompts(), [params] * len(PROMPT_LENS))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        for i, prompt in enumerate(_prompts()):
            got = stub.Generate(
                pb.GenerateRequest(prompt_token_ids=prompt, max_new_tokens=MAX_NEW, ignore_eos=True), timeout=60
            )
            assert list(got.token_ids) == ref[i].token_ids, f"prompt of {PROMPT_LENS[i]} tokens"


def _actor_nodes(cluster, actors) -> list[str]:
    """Each actor's node according to Ray's state API (not the actor's own report)."""
    ids = [a._actor_id.hex() for a in actors]
    alive = {
        s.actor_id: s.node_id
        for s in list_actors(address=cluster.address, filters=[("state", "=", "ALIVE")], limit=1000)
    }
    return [alive[i] for i in ids]


def _reported(server) -> list:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        health = stub.Health(pb.HealthRequest(), timeout=10)
        info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert health.is_serving
    assert list(health.placements) == list(info.placements)
    return list(health.placements)


def test_spread_1p1d_runs_prefill_and_decode_on_different_nodes(cluster, nodes, model_path):
    server = BackgroundServer(_config(model_path, 1, "spread"))
    try:
        dep = server.deployment
        prefill_node, decode_node = _actor_nodes(cluster, dep.prefill + dep.decode)
        assert prefill_node != decode_node and {prefill_node, decode_node} == set(nodes)
        _check_equals_engine(server, model_path)  # KV crossed between the nodes' raylets
        placements = _reported(server)
        assert [(p.role, p.index, p.node_id, p.device) for p in placements] == [
            ("prefill", 0, prefill_node, "cpu"),
            ("decode", 0, decode_node, "cpu"),
        ]
        node_ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        assert [p.node_ip for p in placements] == [node_ips[prefill_node], node_ips[decode_node]]  # rendezvous address
    finally:
        server.stop()


def test_pack_2p1d_puts_every_worker_on_the_node_that_holds_them(cluster, nodes, model_path):
    server = BackgroundServer(_config(model_path, 2, "pack"))
    try:
        dep = server.deployment
        big = max(nodes, key=nodes.get)
        assert _actor_nodes(cluster, dep.prefill + dep.decode) == [big] * 3
        _check_equals_engine(server, model_path)
        assert [p.node_id for p in _reported(server)] == [big] * 3
    finally:
        server.stop()
    # The placement group went with the server: its CPUs are free again.
    deadline = time.monotonic() + 10
    while ray.available_resources().get("CPU", 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 4


def test_more_workers_than_the_cluster_holds_fail_within_the_timeout(cluster, model_path):
    start = time.monotonic()
    with pytest.raises(PlacementError) as err:
        BackgroundServer(_config(model_path, 4, "pack", timeout_s=2))
    assert time.monotonic() - start < 30  # the model load is all that may add to the 2 s
    msg = str(err.value)
    assert "4 prefill + 1 decode workers of {CPU: 1} each (pack) not ready within 2s (--placement-timeout)" in msg
    assert "1 node {CPU: 1}" in msg and "1 node {CPU: 3}" in msg
    states = [pg["state"] for pg in ray.util.placement_group_table().values()]
    assert "PENDING" not in states and "CREATED" not in states  # nothing left waiting for resources


def test_head_gate_waits_for_resources_with_a_timeout(cluster):
    """cluster/wait_for_resources.py, the gate the cluster files' head command runs before serving."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "wait_for_resources", Path(__file__).resolve().parent.parent / "cluster" / "wait_for_resources.py"
    )
    gate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gate)
    said: list[str] = []
    assert gate.wait_for("CPU", 4, timeout_s=5, say=said.append)  # both nodes' CPUs count
    start = time.monotonic()
    assert not gate.wait_for("GPU", 1, timeout_s=0.5, poll_s=0.1, say=said.append)
    assert time.monotonic() - start < 5
    assert said[-1] == "timed out after 0.5s: 0 of 1 GPU on 2 node(s)"
