"""Serving under faults: deadlines, cancellation in every phase, stalled transfers, killed workers.

One Ray instance and one 1P1D POP server (tiny checkpoint, gloo, short timeouts) for the module;
the fault hooks (``inject_fault``, ``pid``) are the actors' own. Every test starts from an idle
server and checks that each block is back on the decode worker when it is done. The decode-kill
test runs last: it replaces the decode worker. Everything is stopped at the end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import ray
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pop_disagg._proto import generation_pb2 as pb
from pop_disagg.config import EngineConfig, ServeConfig
from pop_disagg.disagg.decode_worker import DecodeWorker, Failed
from pop_disagg.disagg.kv_transfer import FakeTransport, KVSender
from pop_disagg.disagg.prefill_worker import PrefillTask, PrefillWorker
from pop_disagg.engine.engine import LLMEngine
from pop_disagg.engine.sampling import SamplingParams
from pop_disagg.models.loader import load_model
from pop_disagg.server.app import BackgroundServer

TRANSFER_TIMEOUT_S = 4.0
WORKER_TIMEOUT_S = 5.0
LONG = 450  # new tokens of a generation that outlives every deadline below


def _engine_config(path):
    # No prefix cache: these tests send the same prompts again and again to fault their transfers,
    # and a prefix the decode worker held would not move (tests/test_prefix_split.py covers that).
    return EngineConfig(model=path, kv_cache_memory_mb=2, block_size=4, enable_prefix_caching=False)


def _prompts(n, seed=5, lens=(9, 17, 25, 33)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (lens[i % len(lens)],), generator=g).tolist() for i in range(n)]


def _msg(ids, max_new, **kw):
    return pb.GenerateRequest(prompt_token_ids=ids, max_new_tokens=max_new, ignore_eos=True, **kw)


def _until(predicate, timeout_s, what):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout_s}s: {what}")


@pytest.fixture(scope="module")
def model_path(tiny_ckpt):
    return tiny_ckpt("qwen2")


@pytest.fixture(scope="module")
def reference(model_path):
    engine = LLMEngine(_engine_config(model_path), model=load_model(model_path), model_path=model_path)

    def run(prompts, max_new):
        return [o.token_ids for o in engine.generate(prompts, SamplingParams(max_new_tokens=max_new, ignore_eos=True))]

    return run


@pytest.fixture(scope="module")
def server(ray_instance, model_path):
    config = ServeConfig(
        engine=_engine_config(model_path), transfer_timeout_s=TRANSFER_TIMEOUT_S, worker_timeout_s=WORKER_TIMEOUT_S
    )
    # No periodic health refresh: grpc.health.v1 must follow the supervisor's state changes alone.
    srv = BackgroundServer(config, health_interval_s=3600)
    yield srv
    srv.stop()


def _decode(server):
    return server.deployment.decode[0]


def _prefill(server):
    return server.deployment.prefill[0]


@contextlib.contextmanager
def _slow_decode(server, seconds=0.01):
    """Every decode step takes at least ``seconds``: a LONG generation outlives the test's deadlines
    and cancels however fast the engine is (CI once finished all of it inside a 1 s deadline)."""
    ray.get(_decode(server).inject_fault.remote("slow_decode", seconds), timeout=30)
    try:
        yield
    finally:
        ray.get(_decode(server).inject_fault.remote("slow_decode", 0.0), timeout=30)


def _stats(server):
    return ray.get(_decode(server).stats.remote(), timeout=30)


def _idle(server, timeout_s=20.0):
    """Every block free, nothing queued for prefill; returns the decode stats."""
    _until(
        lambda: (s := _stats(server))["num_free_blocks"] == s["num_blocks"] and s["num_active"] == 0,
        timeout_s,
        "decode worker idle",
    )
    _until(lambda: ray.get(_prefill(server).load.remote(), timeout=30) == 0, timeout_s, "prefill queue empty")
    return _stats(server)


def _serving(stub, timeout_s=120.0):
    def ok():
        h = stub.Health(pb.HealthRequest(), timeout=10)
        return h if h.is_serving and all(w.state == pb.WORKER_STATE_SERVING for w in h.workers) else None

    return _until(ok, timeout_s, "every worker serving")


def _blocks_back(server, total, within_s, what):
    _until(lambda: _stats(server)["num_free_blocks"] == total, within_s, f"blocks freed {what}")


# ---- worker-level deadlines (no Ray): expired work is dropped even if no abort ever arrives ----
def test_workers_drop_expired_requests_without_an_abort(model_path):
    engine = LLMEngine(_engine_config(model_path), model=load_model(model_path))
    worker = DecodeWorker(engine)
    worker.attach_link(0, FakeTransport.pair()[1])  # a link on which nothing ever arrives
    stop = threading.Event()
    loop = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    loop.start()
    try:
        total = worker.num_free_blocks
        events = {"reserved": [], "decoding": []}
        params = SamplingParams(max_new_tokens=LONG, ignore_eos=True)
        worker.step_delay_s = 0.01  # "decoding" outlives its deadline however fast the engine is
        worker.reserve(
            "reserved", list(range(3, 30)), params, 0, events["reserved"].append, deadline=time.time() + 0.3
        )  # K/V never come
        worker.add_local("decoding", list(range(3, 30)), params, events["decoding"].append, deadline=time.time() + 0.5)
        # The blocks are freed just before the failure event is emitted: wait for both.
        _until(
            lambda: (
                worker.num_free_blocks == total and all(evs and isinstance(evs[-1], Failed) for evs in events.values())
            ),
            5,
            "expired requests freed and ended",
        )
        for name, evs in events.items():
            assert isinstance(evs[-1], Failed) and evs[-1].kind == "deadline", name
    finally:
        stop.set()
        loop.join(5)

    done = []
    arch = engine.arch
    sender = KVSender(FakeTransport.pair()[0], arch.num_layers, (arch.num_kv_heads, arch.head_dim), torch.float32, 1.0)
    prefill = PrefillWorker(load_model(model_path, prefill_only_plan=engine.plan), engine.plan, {0: sender})
    prefill.submit(
        PrefillTask("late", 1, 0, [5, 6, 7], done.append, deadline=time.time() - 1)
    )  # its loop is not running
    assert prefill._take_batch() == [] and done[0].error == "deadline exceeded" and prefill.num_waiting_tokens == 0
    sender.close()


# ---- deadlines and cancellation through the server --------------------------------------------
def test_deadline_exceeded_mid_generation_frees_blocks_within_2s(server, stub):
    total = _idle(server)["num_blocks"]
    received = 0
    with _slow_decode(server), pytest.raises(grpc.RpcError) as err:
        for chunk in stub.GenerateStream(_msg(_prompts(1)[0], LONG), timeout=1.0):
            received += len(chunk.token_ids)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0 < received < LONG  # it was decoding when the deadline passed
    _blocks_back(server, total, 2.0, "after the deadline")


def test_deadline_while_queued_for_prefill(server, stub):
    total = _idle(server)["num_blocks"]
    ray.get(_prefill(server).inject_fault.remote("pause_prefill", 5.0))
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(_msg(_prompts(1)[0], 8), timeout=1.0)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _blocks_back(server, total, 2.0, "after a deadline in the prefill queue")
        _until(lambda: ray.get(_prefill(server).load.remote()) == 0, 2.0, "the prefill queue dropped it")
    finally:
        ray.get(_prefill(server).inject_fault.remote("pause_prefill", 0.0))


@pytest.mark.parametrize("phase", ["queued_for_prefill", "in_transfer", "decoding"])
def test_cancel_in_every_phase_frees_blocks(server, stub, reference, phase):
    total = _idle(server)["num_blocks"]
    retries = server.server.router.stats.num_kv_retries
    prompt = _prompts(1, seed=9)[0]
    if phase == "queued_for_prefill":
        ray.get(_prefill(server).inject_fault.remote("pause_prefill", 10.0))
    elif phase == "in_transfer":
        ray.get(_prefill(server).inject_fault.remote("stall_transfer", TRANSFER_TIMEOUT_S / 2))
    try:
        with _slow_decode(server):  # still decoding at the cancel
            call = stub.GenerateStream(_msg(prompt, LONG), timeout=60)
            if phase == "queued_for_prefill":
                _until(lambda: ray.get(_prefill(server).load.remote()) > 0, 10, "request queued for prefill")
            elif phase == "in_transfer":
                _until(lambda: _stats(server)["num_receiving"] == 1, 10, "K/V arriving")
            else:
                next(call)
            assert _stats(server)["num_free_blocks"] < total
            call.cancel()
            _blocks_back(server, total, 2.0, f"after a cancel while {phase}")
            _until(lambda: ray.get(_prefill(server).load.remote()) == 0, 2.0, "nothing left queued for prefill")
    finally:
        ray.get(_prefill(server).inject_fault.remote("pause_prefill", 0.0))
    # The link is still in step: the next request runs first time, with the right tokens.
    got = stub.Generate(_msg(prompt, 6), timeout=60)
    assert list(got.token_ids) == reference([prompt], 6)[0]
    assert server.server.router.stats.num_kv_retries == retries
    _idle(server)


# ---- stalled transfers ----------------------------------------------------------------------------
def test_stalled_transfer_is_recomputed(server, stub, reference):
    total = _idle(server)["num_blocks"]
    retries = server.server.router.stats.num_kv_retries
    prompt = _prompts(1, seed=11)[0]
    ray.get(_prefill(server).inject_fault.remote("stall_transfer", 2 * TRANSFER_TIMEOUT_S))
    got = stub.Generate(_msg(prompt, 8), timeout=60)
    assert list(got.token_ids) == reference([prompt], 8)[0]
    assert server.server.router.stats.num_kv_retries == retries + 1
    assert _idle(server)["num_free_blocks"] == total
    _serving(stub)


def test_stalled_transfer_fails_under_policy_fail(server, stub, reference):
    total = _idle(server)["num_blocks"]
    router = server.server.router
    router.kv_failure_policy = "fail"  # as `--kv-failure-policy fail` would start it
    try:
        ray.get(_prefill(server).inject_fault.remote("stall_transfer", 2 * TRANSFER_TIMEOUT_S))
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(_msg(_prompts(1, seed=12)[0], 8), timeout=60)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "kv-failure-policy fail" in err.value.details()
        _blocks_back(server, total, 2.0, "after the failed transfer")
    finally:
        router.kv_failure_policy = "recompute"
    _serving(stub)  # the link was re-created
    prompt = _prompts(1, seed=13)[0]
    assert list(stub.Generate(_msg(prompt, 5), timeout=60).token_ids) == reference([prompt], 5)[0]
    _idle(server)


# ---- killed workers -------------------------------------------------------------------------------
def test_killed_prefill_worker_requests_all_complete_with_fault_free_tokens(server, stub, reference):
    total = _idle(server)["num_blocks"]
    prompts = _prompts(4, seed=21)
    expected = reference(prompts, 6)
    prefill = _prefill(server)
    pid = ray.get(prefill.pid.remote())
    with ThreadPoolExecutor(len(prompts)) as pool:
        # The first request is mid-transfer (its sender stalls, short of the transfer timeout)...
        ray.get(prefill.inject_fault.remote("stall_transfer", TRANSFER_TIMEOUT_S * 0.8))
        futures = [pool.submit(stub.Generate, _msg(prompts[0], 6), timeout=120)]
        _until(lambda: _stats(server)["num_receiving"] == 1, 10, "first request's K/V arriving")
        # ...and the others wait in the prefill queue when the process is killed.
        ray.get(prefill.inject_fault.remote("pause_prefill", 30.0))
        futures += [pool.submit(stub.Generate, _msg(p, 6), timeout=120) for p in prompts[1:]]
        queued = sum(len(p) - 1 for p in prompts[1:])
        _until(lambda: ray.get(prefill.load.remote()) == queued, 10, "requests queued for prefill")
        os.kill(pid, signal.SIGKILL)
        got = [list(f.result().token_ids) for f in futures]
    assert got == expected
    health = _serving(stub)
    assert [w.num_restarts for w in health.workers if w.role == "prefill"] == [1]
    assert ray.get(_prefill(server).pid.remote()) != pid
    assert _idle(server)["num_free_blocks"] == total


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _collect_statuses(watch, statuses: list[int]) -> None:
    try:
        for response in watch:
            statuses.append(response.status)
    except grpc.RpcError:  # cancelled at the end of the test
        pass


def test_killed_decode_worker_fails_fast_then_serves_again(server, stub, reference):
    _idle(server)
    pid = ray.get(_decode(server).pid.remote())
    channel = grpc.insecure_channel(server.address)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)
    statuses: list[int] = []
    watcher = threading.Thread(target=_collect_statuses, args=(watch, statuses), daemon=True)
    watcher.start()
    _until(lambda: statuses == [SERVING], 10, "grpc.health.v1 watch started")
    call = stub.GenerateStream(_msg(_prompts(1, seed=31)[0], LONG), timeout=120)
    next(call)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        for _ in call:
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - killed < WORKER_TIMEOUT_S
    assert not stub.Health(pb.HealthRequest(), timeout=10).is_serving  # the replacement is still loading
    health = _serving(stub)
    # The standard health service (what a load balancer or Kubernetes reads) went NOT_SERVING and
    # back with the supervisor's state, although this server never refreshes it on a timer.
    try:
        _until(
            lambda: NOT_SERVING in statuses and statuses[-1] == SERVING,
            10,
            f"grpc.health.v1 NOT_SERVING, then SERVING: {statuses}",
        )
        assert statuses[0] == SERVING
    finally:
        watch.cancel()
        watcher.join(10)
        channel.close()
    assert [w.num_restarts for w in health.workers if w.role == "decode"] == [1]
    prompts = _prompts(2, seed=32)
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda p: list(stub.Generate(_msg(p, 6), timeout=60).token_ids), prompts))
    assert got == reference(prompts, 6)
    stats = _idle(server)
    assert ray.get(_decode(server).pid.remote()) != pid
    assert stats["num_free_blocks"] == stats["num_blocks"]
