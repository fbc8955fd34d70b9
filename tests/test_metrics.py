"""Prometheus metrics of a real 1P1D server, read from its ``/metrics`` endpoint: every series is
there, and after K requests the counters say K and the token counters equal the tokens returned.

One Ray instance and one server (``metrics_port=0``) for the module; everything binds 127.0.0.1 and
is stopped at the end.
"""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
import ray
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from pop_disagg._proto import generation_pb2 as pb
from pop_disagg.config import EngineConfig, ServeConfig
from pop_disagg.server.app import BackgroundServer
from pop_disagg.server.control.metrics import ServerMetrics

SERIES = [
    "num_requests_running",
    "num_requests_waiting",
    "request_success_total",
    "request_failure_total",
    "prompt_tokens_total",
    "generation_tokens_total",
    "time_to_first_token_seconds_count",
    "time_per_output_token_seconds_count",
    "e2e_request_latency_seconds_count",
    "kv_transfer_seconds_count",
    "kv_blocks_free",
    "kv_blocks_total",
    "kv_transfer_bytes_total",
    "worker_restarts_total",
    "num_preemptions_total",
    "prefix_cache_queries_total",
    "prefix_cache_hits_total",
]


@pytest.fixture(scope="module")
def server(ray_instance, tiny_ckpt):
    engine = EngineConfig(model=tiny_ckpt("qwen2"), kv_cache_memory_mb=2, block_size=4, max_model_len=256)
    srv = BackgroundServer(ServeConfig(engine=engine, transfer_timeout_s=20), metrics_port=0, kv_poll_interval_s=0.1)
    yield srv
    srv.stop()


def scrape(server) -> dict[tuple[str, tuple], float]:
    """{(sample name without the prefix, sorted labels): value} from the HTTP endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("pop_disagg:"):
                out[s.name.removeprefix("pop_disagg:"), tuple(sorted(s.labels.items()))] = s.value
    return out


def total(samples, name, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def _wait(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not (ok := predicate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return ok


def test_every_series_is_listed(server):
    samples = scrape(server)
    names = {n for n, _ in samples}
    assert not [s for s in SERIES if s not in names]
    assert {dict(lab)["finished_reason"] for n, lab in samples if n == "request_success_total"} >= {
        "stop",
        "length",
        "abort",
    }
    assert {dict(lab)["role"] for n, lab in samples if n == "worker_restarts_total"} == {"prefill", "decode"}
    num_blocks = ray.get(server.deployment.decode[0].stats.remote())["num_blocks"]
    assert samples["kv_blocks_total", (("worker", "decode-0"),)] == num_blocks


def test_counters_count_what_was_sent(server, stub):
    before = scrape(server)
    # Prompts that share no block with each other or with earlier tests; the 9-token one is sent
    # twice more, its whole prefix (two blocks) then cached on the decode worker: nothing moves.
    prompts = [list(range(3 + 60 * i, 3 + 60 * i + n)) for i, n in enumerate((1, 3, 9, 17))]
    outs = [
        stub.Generate(pb.GenerateRequest(prompt_token_ids=p, max_new_tokens=6, ignore_eos=True), timeout=60)
        for p in prompts
    ]
    chunks = list(
        stub.GenerateStream(
            pb.GenerateRequest(prompt_token_ids=prompts[2], max_new_tokens=6, ignore_eos=True), timeout=60
        )
    )
    # Its first token as a stop token: finished by "stop" after one token.
    stopped = stub.Generate(
        pb.GenerateRequest(prompt_token_ids=prompts[2], max_new_tokens=6, stop_token_ids=[outs[2].token_ids[0]]),
        timeout=60,
    )
    assert stopped.finish_reason == pb.FINISH_REASON_STOP and stopped.usage.completion_tokens <= 1
    k = len(prompts) + 2
    prompt_tokens = sum(map(len, prompts)) + 2 * len(prompts[2])
    generated = sum(len(o.token_ids) for o in outs) + sum(len(c.token_ids) for c in chunks) + len(stopped.token_ids)
    transferred = [len(p) for p in prompts if len(p) > 1]  # a one-token prompt moves no K/V, a cached one neither
    after = scrape(server)
    delta = lambda name, **lab: total(after, name, **lab) - total(before, name, **lab)  # noqa: E731
    assert delta("request_success_total") == k
    assert delta("request_success_total", finished_reason="length") == k - 1
    assert delta("request_success_total", finished_reason="stop") == 1
    assert delta("request_failure_total") == 0
    assert delta("prompt_tokens_total") == prompt_tokens
    assert delta("generation_tokens_total") == generated == 6 * (k - 1) + len(stopped.token_ids)
    assert delta("time_to_first_token_seconds_count") == k - (not stopped.token_ids)
    assert delta("e2e_request_latency_seconds_count") == k
    assert delta("time_per_output_token_seconds_count") == k - 1  # the stopped one has no second token
    assert delta("kv_transfer_seconds_count") == len(transferred)
    bytes_per_token = server.deployment.arch.kv_bytes_per_token(4)
    assert delta("kv_transfer_bytes_total") == sum(n - 1 for n in transferred) * bytes_per_token
    assert total(after, "num_requests_running") == total(after, "num_requests_waiting") == 0
    assert delta("e2e_request_latency_seconds_sum") >= delta("time_to_first_token_seconds_sum") > 0


def test_failures_count_by_status_and_gauges_return_to_zero(server, stub):
    before = scrape(server)
    with pytest.raises(grpc.RpcError):
        stub.Generate(pb.GenerateRequest(prompt_token_ids=[5, 6], max_new_tokens=0), timeout=30)
    call = stub.GenerateStream(
        pb.GenerateRequest(prompt_token_ids=list(range(3, 43)), max_new_tokens=200, ignore_eos=True), timeout=60
    )
    next(call)
    during = scrape(server)
    assert total(during, "num_requests_running") == 1 and total(during, "num_requests_waiting") == 0
    call.cancel()
    assert _wait(
        lambda: (
            total(scrape(server), "request_failure_total", code="CANCELLED")
            == total(before, "request_failure_total", code="CANCELLED") + 1
        )
    )
    after = scrape(server)
    assert (
        total(after, "request_failure_total", code="INVALID_ARGUMENT")
        - total(before, "request_failure_total", code="INVALID_ARGUMENT")
        == 1
    )
    assert total(after, "request_failure_total") - total(before, "request_failure_total") == 2
    assert total(after, "request_success_total") == total(before, "request_success_total")
    assert total(after, "num_requests_running") == total(after, "num_requests_waiting") == 0
    # The free-block gauge follows the decode worker: back to the total once the blocks return.
    assert _wait(
        lambda: (
            (s := scrape(server))["kv_blocks_free", (("worker", "decode-0"),)]
            == s["kv_blocks_total", (("worker", "decode-0"),)]
        )
    )


def test_worker_restarts_and_registries_per_server(server):
    before = total(scrape(server), "worker_restarts_total", role="decode")
    server.server.metrics.count_worker_restart("decode")
    assert total(scrape(server), "worker_restarts_total", role="decode") == before + 1
    # Each server has a registry of its own: a second one in the same process registers cleanly.
    other = ServerMetrics()
    assert other.registry is not server.server.metrics.registry and other.registry is not REGISTRY
    assert other.registry.get_sample_value("pop_disagg:worker_restarts_total", {"role": "decode"}) == 0


def test_engine_counters_follow_each_worker_across_restarts():
    """The decode workers' cumulative counters become Prometheus counters: deltas per worker, and a
    replaced worker (its counters back at zero) adds what it counted since."""
    m = ServerMetrics()
    value = lambda name: m.registry.get_sample_value(f"pop_disagg:{name}_total")  # noqa: E731
    m.set_engine_counters("decode-0", {"num_preemptions": 2, "prefix_cache_queries": 40, "prefix_cache_hits": 8})
    m.set_engine_counters("decode-1", {"num_preemptions": 1, "prefix_cache_queries": 10, "prefix_cache_hits": 0})
    m.set_engine_counters("decode-0", {"num_preemptions": 5, "prefix_cache_queries": 60, "prefix_cache_hits": 16})
    assert (value("num_preemptions"), value("prefix_cache_queries"), value("prefix_cache_hits")) == (6, 70, 16)
    m.set_engine_counters("decode-0", {"num_preemptions": 1, "prefix_cache_queries": 4, "prefix_cache_hits": 4})
    assert (value("num_preemptions"), value("prefix_cache_queries"), value("prefix_cache_hits")) == (7, 74, 20)
