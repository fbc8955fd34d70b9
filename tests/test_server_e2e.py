"""End to end through gRPC: the server answers exactly what the single-process engine answers.

One Ray instance for the module; one 1P1D POP server shared by the streaming, cancellation and
bad-input tests; the other topology/prefill combinations start and stop inside their own case.
Everything binds to 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import ray  # noqa: E402
import torch

from pop_disagg._proto import generation_pb2 as pb  # noqa: E402
from pop_disagg._proto import generation_pb2_grpc as pb_grpc  # noqa: E402
from pop_disagg.config import (
    EngineConfig,  # noqa: E402
    ServeConfig,  # noqa: E402
)
from pop_disagg.engine.engine import LLMEngine  # noqa: E402
from pop_disagg.engine.sampling import SamplingParams  # noqa: E402
from pop_disagg.models.loader import load_model  # noqa: E402
from pop_disagg.server.app import BackgroundServer  # noqa: E402

PROMPT_LENS = (1, 3, 9, 17, 40)
MAX_NEW = (5, 9, 3, 12, 7)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from pop_disagg.models.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("serve-tiny"), "qwen2", seed=3))


def _serve_config(path, topology, prefill, num_prefill=1, **engine_kw):
    engine = EngineConfig(model=path, kv_cache_memory_mb=2, block_size=4, max_model_len=256, **engine_kw)
    return ServeConfig(
        engine=engine, topology=topology, prefill=prefill, num_prefill=num_prefill, transfer_timeout_s=20
    )


def _requests():
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in PROMPT_LENS]
    # Some requests may stop at EOS, others must run to their length.
    return [
        (p, SamplingParams(max_new_tokens=m, ignore_eos=i % 2 == 0)) for i, (p, m) in enumerate(zip(prompts, MAX_NEW))
    ]


def _message(ids, params: SamplingParams, **kw):
    return pb.GenerateRequest(
        prompt_token_ids=ids, max_new_tokens=params.max_new_tokens, ignore_eos=params.ignore_eos, **kw
    )


def _reference(path, config: ServeConfig):
    engine = LLMEngine(config.worker_engine, model=load_model(path), model_path=path)
    reqs = _requests()
    return engine.generate([p for p, _ in reqs], [sp for _, sp in reqs])


def _check_equivalence(server: BackgroundServer, path, reference_config: ServeConfig | None = None):
    ref = _reference(path, reference_config or server.server.config)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        with ThreadPoolExecutor(len(PROMPT_LENS)) as pool:  # concurrent: they batch on the workers
            got = list(pool.map(lambda r: stub.Generate(_message(*r), timeout=60), _requests()))
    for i, (r, g) in enumerate(zip(ref, got)):
        assert list(g.token_ids) == r.token_ids, f"request {i} (prompt of {PROMPT_LENS[i]} tokens)"
        assert g.text == r.text
        assert pb.FinishReason.Name(g.finish_reason) == f"FINISH_REASON_{r.finish_reason.upper()}"
        assert g.usage.prompt_tokens == PROMPT_LENS[i] and g.usage.completion_tokens == len(r.token_ids)
    return got


@pytest.fixture(scope="module")
def server(ray_instance, model_path):
    srv = BackgroundServer(_serve_config(model_path, "disaggregated", "pop"))
    yield srv
    srv.stop()


def _decode_stats(server):
    return ray.get(server.deployment.decode[0].stats.remote())


def test_disaggregated_pop_1p1d_equals_engine(server, model_path):
    got = _check_equivalence(server, model_path)
    long_one = got[PROMPT_LENS.index(40)]
    assert long_one.timings.prefill_s > 0 and long_one.timings.ttft_s > 0
    assert _wait_idle(server)["num_free_blocks"] == _decode_stats(server)["num_blocks"]


@pytest.mark.parametrize(
    "topology,prefill,num_prefill",
    [
        ("disaggregated", "full", 1),
        ("disaggregated", "pop", 2),
        ("disaggregated", "full", 2),
        ("colocated", "pop", 1),
        ("colocated", "full", 1),
    ],
)
def test_combination_equals_engine(ray_instance, model_path, topology, prefill, num_prefill):
    srv = BackgroundServer(_serve_config(model_path, topology, prefill, num_prefill))
    try:
        _check_equivalence(srv, model_path)
        if topology == "colocated" and prefill == "full":
            # A dead worker answers UNAVAILABLE, never a hang.
            ray.kill(srv.deployment.decode[0])
            with grpc.insecure_channel(srv.address) as channel:
                stub = pb_grpc.GenerationStub(channel)
                with pytest.raises(grpc.RpcError) as err:
                    stub.Generate(pb.GenerateRequest(prompt_token_ids=[5, 6, 7], max_new_tokens=3), timeout=30)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert not stub.Health(pb.HealthRequest(), timeout=30).is_serving
    finally:
        srv.stop()


@pytest.mark.parametrize("topology", ["disaggregated", "colocated"])
def test_chunked_prefill_served_equals_whole_prompt_engine(ray_instance, model_path, topology):
    """8-token chunks (prefill worker or colocated engine): the same tokens as the unchunked engine."""
    srv = BackgroundServer(
        _serve_config(model_path, topology, "pop", enable_chunked_prefill=True, max_num_batched_tokens=8)
    )
    try:
        _check_equivalence(srv, model_path, reference_config=_serve_config(model_path, topology, "pop"))
        assert _wait_idle(srv)["num_free_blocks"] == _decode_stats(srv)["num_blocks"]
    finally:
        srv.stop()


def test_stream_equals_unary(stub):
    msg = pb.GenerateRequest(prompt="Keys and values move", max_new_tokens=10, ignore_eos=True)
    unary = stub.Generate(msg, timeout=60)
    chunks = list(stub.GenerateStream(msg, timeout=60))
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert "".join(c.text for c in chunks) == unary.text
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == 10


def test_stop_string_matches_engine_unary_and_stream(server, stub, model_path):
    prompt = [10, 11, 12, 13]
    full = stub.Generate(pb.GenerateRequest(prompt_token_ids=prompt, max_new_tokens=12, ignore_eos=True), timeout=60)
    assert len(full.text) >= 3, f"tiny model produced too little text to test stop strings: {full.text!r}"
    stop = full.text[1:3]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, stop=(stop,))
    ref = LLMEngine(server.server.config.worker_engine, model=load_model(model_path), model_path=model_path).generate(
        [prompt], params
    )[0]
    msg = pb.GenerateRequest(prompt_token_ids=prompt, max_new_tokens=12, ignore_eos=True, stop=[stop])
    cut = stub.Generate(msg, timeout=60)
    assert (cut.text, list(cut.token_ids)) == (ref.text, ref.token_ids)
    assert cut.finish_reason == pb.FINISH_REASON_STOP and stop not in cut.text
    chunks = list(stub.GenerateStream(msg, timeout=60))
    assert "".join(c.text for c in chunks) == ref.text  # nothing streamed that the stop later cuts


def _wait_idle(server, timeout=20.0):
    """Until every decode block is free again (aborts of earlier requests are asynchronous)."""
    deadline = time.monotonic() + timeout
    while (s := _decode_stats(server))["num_free_blocks"] != s["num_blocks"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return s


def test_cancel_mid_stream_returns_blocks(server, stub):
    start = _wait_idle(server)
    assert start["num_free_blocks"] == start["num_blocks"]
    call = stub.GenerateStream(
        pb.GenerateRequest(prompt_token_ids=list(range(3, 43)), max_new_tokens=200, ignore_eos=True), timeout=60
    )
    received = 0
    for chunk in call:
        received += len(chunk.token_ids)
        if received >= 2:
            break
    assert _decode_stats(server)["num_free_blocks"] < start["num_free_blocks"]
    call.cancel()
    assert _wait_idle(server)["num_free_blocks"] == start["num_free_blocks"]
    assert _decode_stats(server)["num_active"] == 0
    assert ray.get(server.deployment.prefill[0].load.remote()) == 0


BAD = [
    ("neither", dict(max_new_tokens=4), "prompt"),
    ("both", dict(prompt="hi", prompt_token_ids=[5, 6], max_new_tokens=4), "prompt"),
    ("too-long", dict(prompt_token_ids=[5] * 300, max_new_tokens=4), "prompt"),
    ("zero-new", dict(prompt_token_ids=[5, 6], max_new_tokens=0), "max_new_tokens"),
    ("beyond-context", dict(prompt_token_ids=[5, 6], max_new_tokens=1000), "max_new_tokens"),
    ("negative-temperature", dict(prompt_token_ids=[5, 6], temperature=-0.5), "temperature"),
    ("top-p-zero", dict(prompt_token_ids=[5, 6], top_p=0.0), "top_p"),
    ("top-p-above-one", dict(prompt_token_ids=[5, 6], top_p=1.5), "top_p"),
    ("unknown-token", dict(prompt_token_ids=[5, 99999]), "prompt_token_ids"),
]


@pytest.mark.parametrize("kwargs,field", [(k, f) for _, k, f in BAD], ids=[n for n, _, _ in BAD])
def test_bad_input_is_invalid_argument_and_server_keeps_serving(stub, kwargs, field):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(**kwargs), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.GenerateStream(pb.GenerateRequest(**kwargs), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    ok = stub.Generate(pb.GenerateRequest(prompt_token_ids=[5, 6, 7], max_new_tokens=2, ignore_eos=True), timeout=30)
    assert len(ok.token_ids) == 2


def test_model_info_and_health(stub):
    info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30)
    assert info.topology == "disaggregated" and info.prefill == "pop"
    assert list(info.skip_layers) == [4, 5] and info.num_layers == 6
    assert stub.Health(pb.HealthRequest(), timeout=30).is_serving


def test_router_stats_count_what_was_served(server, stub):
    """The periodic stats line reads these counters: they must add up to what clients received."""
    stats = server.server.router.stats
    before = dataclasses.replace(stats)
    outs = [
        stub.Generate(
            pb.GenerateRequest(prompt_token_ids=list(range(5, 5 + n)), max_new_tokens=4, ignore_eos=True), timeout=60
        )
        for n in (1, 7)
    ]
    assert stats.num_finished - before.num_finished == 2
    assert stats.num_prompt_tokens - before.num_prompt_tokens == 8
    assert stats.num_generated_tokens - before.num_generated_tokens == sum(len(o.token_ids) for o in outs) == 8
    assert stats.num_failed == before.num_failed


def test_served_kv_correction_is_what_the_decode_worker_attends_to(ray_instance, model_path, tmp_path):
    """`serve --kv-correction`: the prefill worker ships the corrected K/V. Output equals an engine
    whose cache was filled by the corrected prefill-only model, and differs from plain POP."""
    from pop_disagg.calib.kv_correction import fit_kv_correction, load_corrected_prefill_model
    from pop_disagg.models.attention import PrefillAttention
    from pop_disagg.pop.plan import PrunePlan

    model = load_model(model_path)
    plan = PrunePlan.default(model.arch.num_layers)
    g = torch.Generator().manual_seed(11)
    corr = fit_kv_correction(model, plan, [torch.randint(3, 300, (48,), generator=g).tolist() for _ in range(6)])
    # Make the correction unmistakable: the test is about the wiring, not the fit's quality.
    corr.weights = {l: (wk * 0.5, -wv) for l, (wk, wv) in corr.weights.items()}
    path = corr.save(tmp_path)
    config = _serve_config(model_path, "disaggregated", "pop")
    prompt, params = (
        torch.randint(3, 300, (23,), generator=g).tolist(),
        SamplingParams(max_new_tokens=8, ignore_eos=True),
    )

    engine = LLMEngine(config.worker_engine, model=load_model(model_path), model_path=model_path)
    plain = engine.generate([prompt], params)[0].token_ids
    pre, n = load_corrected_prefill_model(model_path, corr), len(prompt) - 1
    req = engine.reserve_request(prompt, params, "ref")
    slots = torch.tensor(engine.blocks.slots(req.block_table, 0, n))
    with torch.no_grad():
        pre(
            torch.tensor(prompt[:n]),
            torch.arange(n),
            PrefillAttention([0, n], lambda l, k, v: engine.kv_cache.write(l, slots, k, v)),
            plan=plan,
        )
    engine.admit_prefilled("ref", n)
    expected = []
    while engine.has_unfinished():
        expected += [t for o in engine.step() for t in o.new_token_ids]
    assert expected != plain

    with pytest.raises(ValueError, match="kv_correction"):
        ServeConfig(**{**config.model_dump(), "topology": "colocated", "kv_correction": str(path)})
    srv = BackgroundServer(ServeConfig(**{**config.model_dump(), "kv_correction": str(path)}))
    try:
        with grpc.insecure_channel(srv.address) as channel:
            got = pb_grpc.GenerationStub(channel).Generate(_message(prompt, params), timeout=60)
        assert list(got.token_ids) == expected
    finally:
        srv.stop()
