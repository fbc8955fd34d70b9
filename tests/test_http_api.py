"""The OpenAI-compatible HTTP API against the gRPC API of the same live server (SmolLM2-135M-Instruct).

One Ray instance and one 1P1D POP server with ``--http-port`` for the module: the official ``openai``
package must get what gRPC gets (greedy and seeded sampling, unary and streaming, completion and
chat); the raw SSE stream must be OpenAI's chunk format; bad parameters get OpenAI's error object
naming the parameter and leave the server serving; a client that disconnects mid-stream gives the
decode worker its blocks back; the standard grpc.health.v1 and reflection answer; the load harness
speaks both protocols with the same result keys. Everything binds to 127.0.0.1 and is stopped.
"""

from __future__ import annotations

import json
import time
import types

import grpc
import httpx
import openai
import pytest
import ray  # noqa: E402

from pop_disagg._proto import generation_pb2 as pb  # noqa: E402

MODEL = "smollm2"
PROMPT = "The three primary colors are"
MESSAGES = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a large ocean."}]


@pytest.fixture(scope="module")
def server(smollm2_http_server):
    return smollm2_http_server


def _finish(msg) -> str:
    return pb.FinishReason.Name(msg.finish_reason).removeprefix("FINISH_REASON_").lower()


def _decode_stats(server):
    return ray.get(server.deployment.decode[0].stats.remote())


def _wait_idle(server, timeout=30.0):
    deadline = time.monotonic() + timeout
    while (s := _decode_stats(server))["num_free_blocks"] != s["num_blocks"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return s


def _sse_events(lines) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


# ---- the openai package == gRPC ------------------------------------------------------------------
SAMPLED = dict(temperature=0.8, top_p=0.9, seed=11)


@pytest.mark.parametrize("options", [dict(temperature=0.0), SAMPLED], ids=["greedy", "seeded"])
def test_openai_completion_equals_grpc(oa, stub, options):
    ref = stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_new_tokens=12, top_k=40, **options), timeout=120)
    extra = {"top_k": 40, "return_token_ids": True}
    got = oa.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, extra_body=extra, **options)
    choice = got.choices[0]
    assert (choice.text, choice.finish_reason) == (ref.text, _finish(ref))
    assert choice.token_ids == list(ref.token_ids)
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (ref.usage.prompt_tokens, len(ref.token_ids))
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    # Disaggregated: the prompt's K/V come from the prefill worker, nothing from a prefix cache.
    assert got.usage.prompt_tokens_details.cached_tokens == 0
    assert got.model == MODEL and got.object == "text_completion"

    chunks = list(
        oa.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
            **options,
        )
    )
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in with_choices) == ref.text
    assert [t for c in with_choices for t in c.choices[0].token_ids] == list(ref.token_ids)
    assert with_choices[-1].choices[0].finish_reason == _finish(ref)
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert chunks[-1].usage.prompt_tokens == ref.usage.prompt_tokens


def test_openai_chat_equals_grpc(server, oa, stub):
    ids = server.deployment.tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    ref = stub.Generate(pb.GenerateRequest(prompt_token_ids=ids, max_new_tokens=16, temperature=0), timeout=120)
    got = oa.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    msg = got.choices[0]
    assert (msg.message.role, msg.message.content, msg.finish_reason) == ("assistant", ref.text, _finish(ref))
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), len(ref.token_ids))
    assert got.object == "chat.completion"

    chunks = list(
        oa.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_completion_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == ref.text
    assert with_choices[-1].choices[0].finish_reason == _finish(ref)
    assert chunks[-1].usage.prompt_tokens == len(ids) and chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_stop_strings_match_grpc(oa, stub):
    full = stub.Generate(
        pb.GenerateRequest(prompt=PROMPT, max_new_tokens=16, temperature=0, ignore_eos=True), timeout=120
    )
    stop = full.text[4:7]
    assert len(stop) == 3, f"too little text to test stop strings: {full.text!r}"
    ref = stub.Generate(
        pb.GenerateRequest(prompt=PROMPT, max_new_tokens=16, temperature=0, ignore_eos=True, stop=[stop]), timeout=120
    )
    got = oa.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop, extra_body={"ignore_eos": True}
    )
    assert (got.choices[0].text, got.choices[0].finish_reason) == (ref.text, "stop")
    streamed = oa.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=16,
        temperature=0,
        stop=[stop],
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(c.choices[0].text for c in streamed) == ref.text


# ---- the wire format -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/completions", {"prompt": [504, 3457, 314, 260], "max_tokens": 5}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_tokens": 5},
        ),
    ],
    ids=["completion", "chat"],
)
@pytest.mark.parametrize("include_usage", [True, False])
def test_stream_chunks_are_openai_format(http, path, body, include_usage):
    body = {
        "model": MODEL,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": include_usage},
        **body,
    }
    with http.stream("POST", path, json=body) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(resp.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    kind = "chat.completion.chunk" if "chat" in path else "text_completion"
    assert {c["object"] for c in chunks} == {kind} and len({c["id"] for c in chunks}) == 1
    assert all(c["model"] == MODEL and isinstance(c["created"], int) for c in chunks)
    if include_usage:
        *chunks, last = chunks
        assert last["choices"] == [] and last["usage"] == {
            "prompt_tokens": last["usage"]["prompt_tokens"],
            "completion_tokens": 5,
            "total_tokens": last["usage"]["prompt_tokens"] + 5,
            "prompt_tokens_details": {"cached_tokens": 0},  # disaggregated: no prefix cache on the prompt
        }
        assert all(c["usage"] is None for c in chunks)
    else:
        assert all("usage" not in c for c in chunks)
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert reasons[-1] == "length" and set(reasons[:-1]) <= {None}
    assert all(c["choices"][0]["index"] == 0 for c in chunks)
    if "chat" in path:
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert all(isinstance(c["choices"][0]["delta"]["content"], str) for c in chunks)


def test_models_and_health(http, server):
    models = http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    card = models["data"][0]
    assert card["object"] == "model" and card["max_model_len"] == 512
    assert (
        card["pop_disagg"]["topology"] == "disaggregated"
        and card["pop_disagg"]["vocab_size"] == server.deployment.arch.vocab_size
    )
    assert http.get("/health").status_code == 200


def test_http_connections_have_tcp_nodelay(server, http):
    """Without TCP_NODELAY each response body waits for a delayed ACK of its headers (~40 ms)."""
    import socket

    assert http.get("/health").status_code == 200  # the client's connection stays open (keep-alive)
    conns = list(server.server._http._uvicorn.server_state.connections)
    assert conns
    for conn in conns:
        sock = conn.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


# ---- refusals ------------------------------------------------------------------------------------
BAD = [
    ("negative-max-tokens", "/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    (
        "zero-max-completion-tokens",
        "/v1/chat/completions",
        {"messages": MESSAGES, "max_completion_tokens": 0},
        400,
        "max_completion_tokens",
    ),
    ("negative-temperature", "/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("top-p-2", "/v1/chat/completions", {"messages": MESSAGES, "top_p": 2}, 400, "top_p"),
    ("unknown-model", "/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("empty-messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("bad-role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("empty-prompt", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("unknown-token-id", "/v1/completions", {"prompt": [5, 10**7]}, 400, "prompt"),
    ("beyond-context", "/v1/completions", {"prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ("n-0", "/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("best-of-3-n-2", "/v1/completions", {"prompt": "hi", "n": 2, "best_of": 3}, 400, "best_of"),
    ("logprobs-21", "/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    (
        "chat-top-logprobs-21",
        "/v1/chat/completions",
        {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21},
        400,
        "top_logprobs",
    ),
    ("refused-parameter", "/v1/completions", {"prompt": "hi", "use_beam_search": True}, 400, "use_beam_search"),
    ("missing-prompt", "/v1/completions", {}, 400, "prompt"),
]


def _assert_still_serving(http):
    ok = http.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "Hello", "max_tokens": 2, "ignore_eos": True, "temperature": 0},
    )
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("path,body,status,param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_parameters_get_openai_errors(http, path, body, status, param):
    for stream in (False, True):
        resp = http.post(path, json={"model": MODEL, "stream": stream, **body})
        assert resp.status_code == status, resp.text
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["param"] == param
        assert err["message"].startswith(param) or param == "model"  # "The model 'gpt-4' does not exist..."
        assert err["type"] == "invalid_request_error"
    _assert_still_serving(http)


def test_malformed_and_oversized_bodies(http):
    resp = http.post(
        "/v1/completions", content=b'{"model": "smollm2", "prompt": ', headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400 and resp.json()["error"]["message"].startswith("malformed JSON")
    huge = json.dumps({"model": MODEL, "prompt": "x" * (10 << 20)}).encode()
    resp = http.post("/v1/completions", content=huge, headers={"content-type": "application/json"})
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit must count the bytes as they come
        for _ in range(10):
            yield b"x" * (1 << 20)

    resp = http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert resp.status_code == 413 and resp.json()["error"]["type"] == "invalid_request_error"
    _assert_still_serving(http)


def test_sdk_raises_typed_errors(oa):
    with pytest.raises(openai.BadRequestError) as err:
        oa.completions.create(model=MODEL, prompt="hi", max_tokens=-1)
    assert err.value.param == "max_tokens" and err.value.status_code == 400
    with pytest.raises(openai.NotFoundError) as err:
        oa.chat.completions.create(model="nope", messages=MESSAGES)
    assert err.value.code == "model_not_found"


def test_auth_token_and_metrics(server, http):
    served = http.get("/metrics")  # the server's own registry (metrics.py), no auth (as vLLM)
    assert served.status_code == 200 and "pop_disagg:request_success_total" in served.text
    server.server.auth_token = "s3cret"
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            resp = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1}, headers=headers)
            assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error"
        assert http.get("/v1/models").status_code == 401
        assert http.get("/health").status_code == 200  # probes need no token
        with openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="s3cret", max_retries=0) as client:
            assert (
                client.completions.create(
                    model=MODEL, prompt="hi", max_tokens=2, extra_body={"ignore_eos": True}
                ).usage.completion_tokens
                == 2
            )
    finally:
        server.server.auth_token = None
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    Counter("pop_disagg_test_events", "a counter only this test registers", registry=registry).inc(3)
    own = server.server.metrics
    server.server.metrics = types.SimpleNamespace(
        registry=registry
    )  # /metrics serves whatever registry the server holds
    try:
        resp = http.get("/metrics")
        assert resp.status_code == 200 and "pop_disagg_test_events_total 3.0" in resp.text
    finally:
        server.server.metrics = own


# ---- disconnects ---------------------------------------------------------------------------------
def test_disconnect_mid_stream_returns_blocks(server, http):
    start = _wait_idle(server)
    assert start["num_free_blocks"] == start["num_blocks"]
    body = {
        "model": MODEL,
        "prompt": PROMPT * 6,
        "max_tokens": 400,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    with httpx.Client(base_url=server.http_url, timeout=120) as client:  # its own connection, closed below
        with client.stream("POST", "/v1/completions", json=body) as resp:
            events = []
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                if len(events) >= 2:
                    break
            # Two token chunks of a live request (not, say, an error event and [DONE]): it holds blocks.
            assert all('"text"' in e for e in events), events
            assert _decode_stats(server)["num_free_blocks"] < start["num_free_blocks"], events
    assert _wait_idle(server)["num_free_blocks"] == start["num_free_blocks"]
    assert _decode_stats(server)["num_active"] == 0
    assert ray.get(server.deployment.prefill[0].load.remote()) == 0
    assert server.server.router.num_running == 0


def test_disconnect_during_unary_request_returns_blocks(server):
    start = _wait_idle(server)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    with httpx.Client(base_url=server.http_url, timeout=httpx.Timeout(60, read=1.5)) as client:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            client.post("/v1/completions", json=body)
    assert _wait_idle(server)["num_free_blocks"] == start["num_free_blocks"]
    assert server.server.router.num_running == 0


# ---- gRPC conventions ----------------------------------------------------------------------------
def test_grpc_health_and_reflection(server, http):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "pop_disagg.v1.Generation"):
            assert (
                health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        db = ProtoReflectionDescriptorDatabase(channel)
        assert {"pop_disagg.v1.Generation", "grpc.health.v1.Health"} <= set(db.get_services())
        methods = {m.name for m in DescriptorPool(db).FindServiceByName("pop_disagg.v1.Generation").methods}
        assert methods == {"Generate", "GenerateStream", "Health", "GetModelInfo"}

        server.server.set_serving(False)  # what drain does
        try:
            deadline = time.monotonic() + 5
            while (
                health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
                != health_pb2.HealthCheckResponse.NOT_SERVING
            ):
                assert time.monotonic() < deadline, "grpc.health.v1 still SERVING after set_serving(False)"
                time.sleep(0.02)
            assert (
                health.Check(health_pb2.HealthCheckRequest(service="pop_disagg.v1.Generation"), timeout=10).status
                == health_pb2.HealthCheckResponse.NOT_SERVING
            )
            resp = http.get("/health")
            assert resp.status_code == 503 and resp.json()["error"]["type"] == "service_unavailable"
        finally:
            server.server.set_serving(True)
        deadline = time.monotonic() + 5
        while (
            health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
            != health_pb2.HealthCheckResponse.SERVING
        ):
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert http.get("/health").status_code == 200


# ---- the load harness speaks both ----------------------------------------------------------------
def test_bench_serve_backends_write_the_same_metric_keys(server, tmp_path, capsys):
    from pop_disagg.bench.report import load_result
    from pop_disagg.cli import main

    common = [
        "--random-input-len",
        "4:30",
        "--random-output-len",
        "2:6",
        "--ignore-eos",
        "--num-prompts",
        "6",
        "--request-rate",
        "50",
        "--seed",
        "3",
        "--num-warmup",
        "1",
        "--no-progress",
        "--metric-percentiles",
        "50,99",
    ]
    results = {}
    for backend, target in (
        ("grpc", ["--server", server.address]),
        ("openai", ["--base-url", server.http_url]),
        ("openai-chat", ["--base-url", server.http_url]),
    ):
        out = tmp_path / f"{backend}.json"
        # vLLM's --save-result spelling for one of them, --output for the others.
        where = (
            ["--save-result", "--result-dir", str(tmp_path), "--result-filename", out.name]
            if backend == "grpc"
            else ["--output", str(out)]
        )
        assert main(["bench", "serve", "--backend", backend, *target, *common, *where]) == 0, backend
        results[backend] = load_result(out)
    capsys.readouterr()
    grpc_r, http_r, chat_r = results["grpc"], results["openai"], results["openai-chat"]
    assert set(grpc_r) == set(http_r) == set(chat_r)
    assert set(grpc_r["summary"]) == set(http_r["summary"]) == set(chat_r["summary"])
    assert {"completed", "mean_ttft_ms", "median_tpot_ms", "p50_itl_ms", "p99_ttft_ms", "request_throughput"} <= set(
        grpc_r
    )
    for name, r in results.items():
        assert r["backend"] == name and r["completed"] == r["summary"]["num_completed"] == 6, name
        assert r["median_ttft_ms"] == r["p50_ttft_ms"] == pytest.approx(r["summary"]["ttft_ms"]["median"])
        assert r["p99_tpot_ms"] == pytest.approx(r["summary"]["tpot_ms"]["p99"])
        for rec in r["requests"]:
            assert rec["is_success"] and rec["finish_reason"] == "length"
            # The HTTP client counts tokens exactly (return_token_ids), so ITL/TPOT compare with gRPC.
            assert rec["num_output_tokens"] == rec["usage_completion_tokens"] == rec["max_new_tokens"]
    # Completions get the very same token-id prompts as gRPC: same requests, same counts.
    assert [r["usage_prompt_tokens"] for r in grpc_r["requests"]] == [
        r["usage_prompt_tokens"] for r in http_r["requests"]
    ]
    assert grpc_r["total_output_tokens"] == http_r["total_output_tokens"] == chat_r["total_output_tokens"]


def test_bench_serve_openai_unreachable_is_one_line(capsys):
    from pop_disagg.cli import main

    argv = [
        "bench",
        "serve",
        "--backend",
        "openai",
        "--base-url",
        "http://127.0.0.1:9",
        "--connect-timeout",
        "0.5",
        "--num-prompts",
        "1",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach an OpenAI-compatible server at http://127.0.0.1:9" in err[0]
