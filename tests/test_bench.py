"""The load-testing harness: arrival statistics, metric maths, workloads, the client against a fake
gRPC server (failures, schedule, concurrency), and an end-to-end run against a real server."""

from __future__ import annotations

import asyncio
import io
import json
import math
import warnings

import numpy as np
import pytest

from pop_disagg._proto import generation_pb2 as pb
from pop_disagg._proto import generation_pb2_grpc as pb_grpc
from pop_disagg.bench.arrivals import arrival_gaps
from pop_disagg.bench.metrics import RequestRecord, meets_slos, parse_slos, summarize
from pop_disagg.bench.report import format_sweep_table, load_result
from pop_disagg.bench.runner import RunSettings, ServerUnreachable, check_server, run_requests
from pop_disagg.bench.workloads import (
    BenchRequest,
    LengthSpec,
    file_requests,
    iter_json_array,
    random_requests,
    sharegpt_requests,
)


# ---- arrivals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("rate,burstiness", [(4.0, 1.0), (4.0, 0.25), (0.5, 4.0)])
def test_arrival_gaps_have_the_requested_rate_and_burstiness(rate, burstiness):
    gaps = arrival_gaps(40_000, rate, burstiness, seed=1)
    assert (gaps >= 0).all()
    assert abs(1 / gaps.mean() - rate) / rate < 0.03
    cv = gaps.std() / gaps.mean()
    assert abs(cv - 1 / math.sqrt(burstiness)) < 0.05 / math.sqrt(burstiness)


def test_arrival_gaps_infinite_rate_seed_and_bad_settings():
    assert (arrival_gaps(100, math.inf, 1.0) == 0).all()
    np.testing.assert_array_equal(arrival_gaps(50, 2.0, 0.5, seed=7), arrival_gaps(50, 2.0, 0.5, seed=7))
    assert not np.array_equal(arrival_gaps(50, 2.0, 0.5, seed=7), arrival_gaps(50, 2.0, 0.5, seed=8))
    for rate, b in [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (1.0, math.inf)]:
        with pytest.raises(ValueError):
            arrival_gaps(3, rate, b)


# ---- metrics -------------------------------------------------------------------------------------
def _record(i, chunk_times, chunk_tokens, end, error=None, n_in=10):
    return RequestRecord(
        index=i,
        num_prompt_tokens=n_in,
        max_new_tokens=sum(chunk_tokens),
        chunk_times_s=list(chunk_times),
        chunk_num_tokens=list(chunk_tokens),
        end_s=end,
        error=error,
        finish_reason=None if error else "length",
    )


def test_request_metrics_follow_vllm_definitions():
    # First token at 0.1 s; a 2-token chunk at 0.3 s; a 1-token chunk at 0.4 s; stream ends at 0.5 s.
    r = _record(0, [0.1, 0.3, 0.4], [1, 2, 1], 0.5)
    assert r.num_output_tokens == 4 and r.is_success
    assert r.ttft_s == pytest.approx(0.1)
    assert r.e2e_s == pytest.approx(0.5)
    assert r.tpot_s == pytest.approx((0.5 - 0.1) / 3)
    # The 2-token chunk's 0.2 s gap counts as two gaps of 0.1 s.
    assert r.itls_s == pytest.approx([0.1, 0.1, 0.1])
    one = _record(1, [0.2], [1], 0.25)
    assert one.tpot_s is None and one.itls_s == []
    # Extra tokens in the first chunk add no gap.
    assert _record(2, [0.2, 0.4], [3, 1], 0.4).itls_s == pytest.approx([0.2])
    failed = _record(3, [0.1], [1], None, error="UNAVAILABLE: worker died")
    assert not failed.is_success and failed.tpot_s is None
    assert RequestRecord.from_json(json.loads(json.dumps(r.to_json()))) == r


def test_summary_percentiles_throughput_and_goodput():
    ttfts = [0.1, 0.2, 0.3, 0.4, 1.0]
    ok = [_record(i, [t, t + 0.05 * (i + 1)], [1, 1], t + 0.05 * (i + 1), n_in=10 + i) for i, t in enumerate(ttfts)]
    bad = [
        _record(5, [], [], None, error="timeout: no answer within 1s"),
        _record(6, [0.1], [1], 0.2, error="aborted: x"),
    ]
    s = summarize(ok + bad, duration_s=2.0, slos=parse_slos(["ttft:350", "tpot:120"]))
    assert (s["num_requests"], s["num_completed"], s["num_failed"]) == (7, 5, 2)
    assert s["failures"] == {"timeout": 1, "aborted": 1}
    assert s["total_input_tokens"] == sum(10 + i for i in range(5)) and s["total_output_tokens"] == 10
    assert s["request_throughput"] == pytest.approx(2.5) and s["output_throughput"] == pytest.approx(5.0)
    assert s["total_token_throughput"] == pytest.approx((60 + 10) / 2.0)
    ms = np.array(ttfts) * 1e3
    assert s["ttft_ms"]["mean"] == pytest.approx(400.0)
    assert s["ttft_ms"]["median"] == pytest.approx(300.0)
    assert s["ttft_ms"]["p90"] == pytest.approx(np.percentile(ms, 90)) == pytest.approx(760.0)
    assert s["ttft_ms"]["p99"] == pytest.approx(976.0)
    # TPOT of request i = 0.05 (i+1) s with 2 tokens; ITL is the same single gap.
    assert s["tpot_ms"]["median"] == pytest.approx(150.0) and s["itl_ms"]["median"] == pytest.approx(150.0)
    # Good: ttft <= 350 ms and tpot <= 120 ms -> requests 0 (100, 50) and 1 (200, 100); 2 has tpot 150.
    assert s["num_good"] == 2 and s["goodput"] == pytest.approx(1.0) and s["slo_attainment"] == pytest.approx(2 / 7)
    # A one-token output meets any TPOT SLO; a failed request meets none.
    assert meets_slos(_record(9, [0.1], [1], 0.1), {"tpot": 1.0})
    assert not meets_slos(bad[1], {"ttft": 1e9})
    assert summarize([], 0.0)["ttft_ms"]["median"] is None
    for wrong in (["ttft"], ["ttft:abc"], ["latency:10"], ["tpot:-1"]):
        with pytest.raises(ValueError):
            parse_slos(wrong)


# ---- workloads -----------------------------------------------------------------------------------
def test_length_specs_and_random_workload_fit_the_model():
    rng = np.random.default_rng(0)
    assert (LengthSpec.parse("7").sample(rng, 5) == 7).all()
    u = LengthSpec.parse("3:9").sample(rng, 2000)
    assert u.min() == 3 and u.max() == 9
    assert abs(np.median(LengthSpec.parse("lognormal:100:0.5").sample(rng, 4000)) - 100) < 8
    assert abs(LengthSpec.parse("exp:50").sample(rng, 4000).mean() - 50) < 4
    assert LengthSpec.parse("normal:2:50").sample(rng, 500).min() >= 1
    for bad in ("0", "9:3", "x", "normal:5", "gauss:1:2", "exp:-1"):
        with pytest.raises(ValueError):
            LengthSpec.parse(bad)
    reqs = random_requests(
        50,
        LengthSpec.parse("10:200"),
        LengthSpec.parse("50"),
        vocab_size=64,
        context_limit=128,
        seed=3,
        exclude_ids=(2, 5),
    )
    assert len(reqs) == 50
    for r in reqs:
        assert r.num_prompt_tokens == len(r.prompt_token_ids) and r.num_prompt_tokens + r.max_new_tokens <= 128
        assert all(0 <= t < 64 and t not in (2, 5) for t in r.prompt_token_ids)
    assert max(r.num_prompt_tokens for r in reqs) == 128 - 50
    assert random_requests(5, LengthSpec.parse("10:20"), LengthSpec.parse("4"), 64, 128, seed=3) == random_requests(
        5, LengthSpec.parse("10:20"), LengthSpec.parse("4"), 64, 128, seed=3
    )


def test_streaming_json_array_reads_truncated_files():
    data = [{"id": i, "conversations": [{"from": "human", "value": "q" * i}], "n": 1.5e3} for i in range(30)]
    text = json.dumps(data, indent=1)
    for chunk_size in (1, 7, 4096):
        assert list(iter_json_array(io.BytesIO(text.encode()), chunk_size)) == data
    cut = text[: text.index('"id": 20') - 5]  # inside element 19's successor
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = list(iter_json_array(io.BytesIO(cut.encode()), 64))
    assert got == data[:20] and any("truncated" in str(w.message) for w in caught)
    # Multi-byte characters split across chunk boundaries survive.
    uni = [{"value": "héllo wörld ✓ 中文"}] * 5
    assert list(iter_json_array(io.BytesIO(json.dumps(uni, ensure_ascii=False).encode()), 3)) == uni
    with pytest.raises(ValueError):
        list(iter_json_array(io.BytesIO(b'{"a": 1}')))


class _WordTokenizer:
    """One token per whitespace-separated word (enough to test length filters)."""

    def encode(self, text, add_special_tokens=True):
        return list(range(len(text.split())))


def test_sharegpt_and_file_workloads(tmp_path):
    w = lambda n: " ".join(["w"] * n)  # noqa: E731
    pairs = [(w(2), w(10)), (w(10), w(2)), (w(30), w(10)), (w(10), w(100)), (w(5), w(6)), (w(8), w(9)), (w(12), w(20))]
    reqs = sharegpt_requests(pairs, 3, _WordTokenizer(), context_limit=64, seed=0, max_prompt_len=20)
    # Kept only: (5, 6), (8, 9), (12, 20); too-short prompts/replies, prompts > 20 and pairs > 64 tokens are skipped.
    assert sorted((r.num_prompt_tokens, r.max_new_tokens) for r in reqs) == [(5, 6), (8, 9), (12, 20)]
    assert all(r.prompt is not None and r.prompt_token_ids is None for r in reqs)
    fixed = sharegpt_requests(
        pairs, 2, _WordTokenizer(), context_limit=64, seed=1, fixed_output_len=5, max_prompt_len=20
    )
    assert all(r.max_new_tokens == 5 for r in fixed)
    with pytest.raises(ValueError, match="only 3 of 4"):
        sharegpt_requests(pairs, 4, _WordTokenizer(), context_limit=64, max_prompt_len=20)

    f = tmp_path / "w.jsonl"
    f.write_text('{"prompt": "a b c", "output_len": 3}\n\n{"prompt_token_ids": [1, 2, 3, 4]}\n')
    got = file_requests(f, 3, default_output_len=7, context_limit=64, tokenizer=_WordTokenizer())
    assert got == [
        BenchRequest("a b c", None, 3, 3),
        BenchRequest(None, (1, 2, 3, 4), 4, 7),
        BenchRequest("a b c", None, 3, 3),
    ]
    f.write_text('{"prompt": "a", "prompt_token_ids": [1]}\n')
    with pytest.raises(ValueError, match="w.jsonl:1"):
        file_requests(f, 1, 7, 64)


# ---- the client against a fake server ------------------------------------------------------------
class _FakeGeneration(pb_grpc.GenerationServicer):
    """Scripted by max_new_tokens: 1 -> UNAVAILABLE, 2 -> finish ABORT, 3 -> hang, else stream tokens
    in chunks of 1, 2, 2, ... (every 10 ms) and finish LENGTH."""

    def __init__(self):
        self.num_in_flight = self.max_in_flight = 0

    async def GenerateStream(self, request, context):
        import grpc

        self.num_in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.num_in_flight)
        try:
            n = request.max_new_tokens
            if n == 1:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "decode worker 0 is unavailable")
            if n == 2:
                yield pb.GenerateStreamResponse(request_id="r", token_ids=[5])
                yield pb.GenerateStreamResponse(request_id="r", finish_reason=pb.FINISH_REASON_ABORT)
                return
            if n == 3:
                await asyncio.sleep(5)
            sizes, sent = [], 0
            while sent < n:
                sizes.append(min(1 if not sizes else 2, n - sent))
                sent += sizes[-1]
            for k in sizes:
                await asyncio.sleep(0.01)
                yield pb.GenerateStreamResponse(request_id="r", token_ids=[7] * k)
            yield pb.GenerateStreamResponse(
                request_id="r",
                finish_reason=pb.FINISH_REASON_LENGTH,
                usage=pb.Usage(prompt_tokens=len(request.prompt_token_ids), completion_tokens=n),
                timings=pb.Timings(ttft_s=0.01),
            )
        finally:
            self.num_in_flight -= 1

    async def Health(self, request, context):
        return pb.HealthResponse(is_serving=True, message="serving", num_prefill_workers=1, num_decode_workers=1)

    async def GetModelInfo(self, request, context):
        return pb.ModelInfoResponse(
            model="fake", vocab_size=100, context_limit=64, topology="colocated", prefill="full"
        )


async def _with_fake_server(fn):
    import grpc

    fake = _FakeGeneration()
    server = grpc.aio.server()
    pb_grpc.add_GenerationServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        return await fn(f"127.0.0.1:{port}", fake)
    finally:
        await server.stop(0)


def test_client_records_failures_and_follows_the_schedule():
    reqs = [BenchRequest(None, (1, 2, 3), 3, n) for n in (6, 1, 2, 3, 5, 4)]
    settings = RunSettings(
        request_rate=40.0, burstiness=0.5, num_requests=12, num_warmup=0, seed=4, request_timeout_s=0.5
    )

    async def go(addr, fake):
        health, info = await check_server(addr)
        assert health["is_serving"] and info["topology"] == "colocated" and info["vocab_size"] == 100
        return await run_requests(addr, settings, reqs, show_progress=False)

    run = asyncio.run(_with_fake_server(go))
    assert len(run.records) == 12  # the 6 requests cycled twice
    expected = np.concatenate([[0.0], np.cumsum(arrival_gaps(11, 40.0, 0.5, seed=4))])
    np.testing.assert_allclose([r.scheduled_s for r in run.records], expected)
    assert all(r.send_s >= r.scheduled_s - 1e-3 for r in run.records)
    by_n = {}
    for r in run.records:
        by_n.setdefault(r.max_new_tokens, []).append(r)
    assert all(r.error.startswith("UNAVAILABLE: decode worker 0") for r in by_n[1])
    assert all(r.error.startswith("aborted") for r in by_n[2])
    assert all(r.error.startswith("timeout") for r in by_n[3])
    for n in (4, 5, 6):
        for r in by_n[n]:
            assert r.is_success and r.finish_reason == "length"
            assert r.num_output_tokens == r.usage_completion_tokens == n and r.usage_prompt_tokens == 3
            assert len(r.itls_s) == n - 1 and r.server_timings["ttft_s"] == pytest.approx(0.01)
    s = summarize(run.records, run.duration_s)
    assert (s["num_completed"], s["num_failed"]) == (6, 6)
    assert s["failures"] == {"UNAVAILABLE": 2, "aborted": 2, "timeout": 2}
    assert s["total_output_tokens"] == 2 * (4 + 5 + 6)


def test_client_respects_max_concurrency_and_duration():
    reqs = [BenchRequest(None, (1,), 1, 6)]
    settings = RunSettings(request_rate=math.inf, max_concurrency=2, num_requests=6, num_warmup=1)

    async def go(addr, fake):
        run = await run_requests(addr, settings, reqs, warmup=reqs, show_progress=False)
        return run, fake.max_in_flight

    run, max_in_flight = asyncio.run(_with_fake_server(go))
    assert max_in_flight == 2 and len(run.records) == 6 and all(r.is_success for r in run.records)
    # Held back by the slots: later requests are sent after they were scheduled (all at 0).
    assert sorted(r.send_s for r in run.records)[-1] > 0.04
    timed = RunSettings(request_rate=50.0, duration_s=0.3, num_warmup=0)
    run = asyncio.run(_with_fake_server(lambda addr, fake: run_requests(addr, timed, reqs, show_progress=False)))
    assert 5 <= len(run.records) <= 30 and all(r.scheduled_s < 0.3 for r in run.records)


def test_unreachable_server_is_one_line_and_nonzero(capsys):
    import socket

    from pop_disagg.cli import main

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ServerUnreachable):
        asyncio.run(check_server(f"127.0.0.1:{port}", connect_timeout_s=0.5))
    assert main(["bench", "serve", "--server", f"127.0.0.1:{port}", "--connect-timeout", "0.5", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach" in err[0] and str(port) in err[0]


# ---- end to end against a real server ------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    import ray

    from pop_disagg.config import EngineConfig, ServeConfig
    from pop_disagg.models.tiny import make_tiny_model
    from pop_disagg.server.app import BackgroundServer

    path = str(make_tiny_model(tmp_path_factory.mktemp("bench-tiny"), "llama", seed=5))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    server = None
    try:
        engine = EngineConfig(model=path, kv_cache_memory_mb=4, block_size=4, max_model_len=256)
        server = BackgroundServer(
            ServeConfig(engine=engine, topology="disaggregated", prefill="pop", transfer_timeout_s=20)
        )
        yield server
    finally:
        if server is not None:
            server.stop()
        ray.shutdown()


def test_end_to_end_results_agree_with_the_server(tiny_server, tmp_path, capsys):
    from pop_disagg.cli import main

    out = tmp_path / "run.json"
    argv = [
        "bench",
        "serve",
        "--server",
        tiny_server.address,
        "--input-len",
        "4:60",
        "--output-len",
        "2:9",
        "--ignore-eos",
        "--num-requests",
        "20",
        "--request-rate",
        "100",
        "--seed",
        "2",
        "--slo",
        "ttft:60000",
        "tpot:60000",
        "--output",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    assert "Request throughput" in capsys.readouterr().out
    result = load_result(out)
    s, recs = result["summary"], result["requests"]
    info = result["server"]["model_info"]
    assert info["topology"] == "disaggregated" and info["prefill"] == "pop" and result["label"] == "disaggregated/pop"
    assert len(recs) == 20 and (s["num_completed"], s["num_failed"]) == (20, 0)
    for r in recs:
        # What the client counted equals what the server reported, and --ignore-eos forces the lengths.
        assert r["num_output_tokens"] == r["usage_completion_tokens"] == r["max_new_tokens"]
        assert r["usage_prompt_tokens"] == r["num_prompt_tokens"]
        assert r["finish_reason"] == "length" and r["server_timings"]["ttft_s"] > 0
        assert 0 < r["ttft_s"] <= r["e2e_s"]
    assert s["total_output_tokens"] == sum(r["usage_completion_tokens"] for r in recs)
    assert s["total_input_tokens"] == sum(r["usage_prompt_tokens"] for r in recs)
    assert s["num_good"] == 20 and s["ttft_ms"]["p99"] >= s["ttft_ms"]["median"] > 0

    # A two-rate sweep and its plot.
    sweep = tmp_path / "sweep.json"
    argv = [
        "bench",
        "serve",
        "--server",
        tiny_server.address,
        "--input-len",
        "8",
        "--output-len",
        "3",
        "--ignore-eos",
        "--num-requests",
        "4",
        "--sweep-rates",
        "50,inf",
        "--output",
        str(sweep),
        "--no-progress",
        "--label",
        "tiny",
    ]
    assert main(argv) == 0
    files = sorted(tmp_path.glob("sweep-rate*.json"))
    assert [f.name for f in files] == ["sweep-rate50.json", "sweep-rateinf.json"]
    assert main(["bench", "plot", *map(str, files), "--out", str(tmp_path / "p.png"), "--markdown"]) == 0
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    table = format_sweep_table([load_result(f) for f in files], markdown=True)
    assert table.count("| tiny |") == 2
