"""The OpenAI surface beyond plain sampling: logprobs, logits processors, tokenize/detokenize, extensions.

Engine level (tiny checkpoints, CPU): raw logprobs equal Transformers' own ``log_softmax``; every
greedy token under a penalty / ``logit_bias`` / ``min_tokens`` is the argmax of the formula applied
by hand to the raw logits the engine had at that step; a request without any of it samples exactly
as before. Server level (one 1P1D POP server on SmolLM2, HTTP + gRPC): the ``openai`` package parses
logprobs in its own types, streaming and not, over both front ends; bad values get a 400 naming
the parameter and the server keeps serving.
"""

from __future__ import annotations

import math

import pytest
import torch

from pop_disagg.config import EngineConfig, PruneConfig
from pop_disagg.engine.engine import LLMEngine
from pop_disagg.engine.sampling import SamplingParams, make_generator, process_logits, sample, token_logprobs
from pop_disagg.limits import InvalidRequest, ModelLimits
from pop_disagg.models.loader import load_model


@pytest.fixture(scope="module")
def full_engine(tiny_ckpt):
    path = tiny_ckpt("llama")
    # Prefix caching off: the tests replay one prompt and read every token's logits off the decode
    # steps; a warm repeat would sample its first token in its prefill step instead.
    cfg = EngineConfig(
        model=path, kv_cache_memory_mb=2, block_size=4, prune=PruneConfig(no_prune=True), enable_prefix_caching=False
    )
    return LLMEngine(cfg, model=load_model(path), model_path=path)


PROMPT = [5, 9, 13, 40, 41, 42, 7]


def _recording(engine):
    """Wrap the runner's decode_logits so every decode step's raw (B, V) logits are kept."""
    seen, real = [], engine.runner.decode_logits

    def record(reqs):
        out = real(reqs)
        seen.append(out.clone())
        return out

    engine.runner.decode_logits = record
    return seen, lambda: setattr(engine.runner, "decode_logits", real)


def _by_hand(raw: torch.Tensor, prompt: list[int], out: list[int], p: SamplingParams, eos: set[int]) -> torch.Tensor:
    """vLLM's formulas, one token at a time in plain Python (the reference for ``process_logits``)."""
    x = raw.double().clone()
    if len(out) < p.min_tokens:
        for t in eos | set(p.stop_token_ids):
            x[t] = -math.inf
    for t, b in p.logit_bias.items():
        x[t] += b
    for t in set(prompt) | set(out):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(out):
        x[t] -= p.frequency_penalty * out.count(t) + p.presence_penalty
    return x


PROCESSED = [
    dict(repetition_penalty=1.8),
    dict(repetition_penalty=0.6),
    dict(frequency_penalty=1.5),
    dict(presence_penalty=-1.0, frequency_penalty=0.5),
    dict(logit_bias={3: 8.0, 17: -100.0}),
    dict(min_tokens=6, repetition_penalty=1.3),
]


@pytest.mark.parametrize("options", PROCESSED, ids=lambda o: ",".join(o))
def test_greedy_with_processors_follows_the_formula(full_engine, options):
    params = SamplingParams(max_new_tokens=10, **options)
    plain = full_engine.generate([PROMPT], SamplingParams(max_new_tokens=10))[0].token_ids
    seen, restore = _recording(full_engine)
    try:
        got = full_engine.generate([PROMPT], params)[0].token_ids
    finally:
        restore()
    # The no-prune prefill samples nothing; every token comes from one recorded decode step.
    assert len(seen) == len(got)
    for i, raw in enumerate(seen):
        expected = _by_hand(raw[0], PROMPT, got[:i], params, full_engine.eos_token_ids)
        assert got[i] == int(expected.argmax()), f"token {i}"
    if "logit_bias" in options:
        assert 17 not in got
    if options != dict(repetition_penalty=0.6):  # a penalty < 1 encourages repeats: may equal plain
        assert got != plain or options.get("min_tokens")


def test_min_tokens_holds_back_eos(full_engine):
    eos = min(full_engine.eos_token_ids)
    # A bias that makes EOS the certain argmax: without min_tokens it ends at once.
    bias = {eos: 100.0}
    assert full_engine.generate([PROMPT], SamplingParams(max_new_tokens=8, logit_bias=bias))[0].token_ids == [eos]
    out = full_engine.generate([PROMPT], SamplingParams(max_new_tokens=8, logit_bias=bias, min_tokens=4))[0]
    assert out.token_ids[:4] != [eos] * 4 and eos not in out.token_ids[:4] and out.token_ids[4] == eos
    assert out.finish_reason == "stop"


def test_process_logits_batched_equals_by_hand():
    torch.manual_seed(0)
    vocab = 50
    logits = torch.randn(4, vocab) * 3

    class R:
        def __init__(self, params, prompt, out):
            self.params, self.prompt_token_ids, self.output_token_ids = params, prompt, out

    reqs = [
        R(SamplingParams(max_new_tokens=8, repetition_penalty=1.5, frequency_penalty=0.7), [1, 2, 3], [3, 3, 9]),
        R(SamplingParams(max_new_tokens=8), [4], [5]),  # untouched
        R(SamplingParams(max_new_tokens=8, presence_penalty=2.0, logit_bias={0: -5.5}), [7], [7, 8, 8, 8]),
        R(SamplingParams(max_new_tokens=8, min_tokens=5, stop_token_ids=(11,)), [1], [2]),
    ]
    got = process_logits(logits, reqs, eos_token_ids=(10,))
    for i, r in enumerate(reqs):
        ref = _by_hand(logits[i], r.prompt_token_ids, r.output_token_ids, r.params, {10})
        torch.testing.assert_close(got[i].double(), ref, rtol=1e-6, atol=1e-5)
    assert got[1].data_ptr() != logits[1].data_ptr() and torch.equal(got[1], logits[1])
    assert process_logits(logits, [reqs[1]] * 4) is logits  # nobody asks: no copy at all


def test_unprocessed_sampling_is_unchanged(full_engine):
    """A request without processors or logprobs samples exactly what ``sample`` alone gives."""
    torch.manual_seed(1)
    logits = torch.randn(3, 64)
    p = SamplingParams(temperature=0.9, top_k=20, seed=3)
    a = sample(logits, [p] * 3, [make_generator(3, torch.device("cpu")) for _ in range(3)])
    b = sample(
        process_logits(logits, [type("R", (), {"params": p})()] * 3),
        [p] * 3,
        [make_generator(3, torch.device("cpu")) for _ in range(3)],
    )
    assert a == b


def test_logprobs_are_raw_and_equal_transformers(tiny_ckpt, full_engine):
    from transformers import AutoModelForCausalLM

    path = tiny_ckpt("llama")
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    # Temperature and a penalty change the sampled token's distribution, never the reported logprobs.
    params = SamplingParams(max_new_tokens=6, temperature=0.7, seed=5, repetition_penalty=1.2, logprobs=3)
    out = full_engine.generate([PROMPT], params)[0]
    # The engine's outputs carry one TokenLogprob per token; rebuild them through the request state.
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPT + out.token_ids])).logits[0].double()
    ref = logits.log_softmax(-1)[len(PROMPT) - 1 : -1]  # (T, V) the distribution each token came from
    lps = out.logprobs
    assert [lp.token_id for lp in lps] == out.token_ids
    for i, lp in enumerate(lps):
        assert lp.logprob == pytest.approx(float(ref[i, lp.token_id]), abs=1e-4)
        top_v, top_i = ref[i].topk(3)
        assert [t for t, _ in lp.top] == top_i.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top_v.tolist(), abs=1e-4)


def test_token_logprobs_only_for_rows_that_ask():
    logits = torch.randn(3, 40)
    got = token_logprobs(logits, [1, 2, 3], [None, 0, 5])
    assert got[0] is None and got[1].top == [] and len(got[2].top) == 5
    assert got[1].logprob == pytest.approx(float(logits[1].log_softmax(-1)[2]), abs=1e-6)


@pytest.mark.parametrize(
    "options,field",
    [
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-3), "frequency_penalty"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(min_tokens=9, max_new_tokens=8), "min_tokens"),
        (dict(logit_bias={3: 101.0}), "logit_bias"),
        (dict(logprobs=21), "logprobs"),
    ],
)
def test_sampling_ranges_name_the_field(options, field):
    from pop_disagg._proto import generation_pb2 as pb
    from pop_disagg.server.frontend.protocol import parse_generate

    msg = pb.GenerateRequest(prompt_token_ids=[1, 2, 3])
    for k, v in options.items():
        if k == "logit_bias":
            msg.logit_bias.update(v)
        else:
            setattr(msg, k, v)
    with pytest.raises(InvalidRequest) as err:
        parse_generate(msg, None, ModelLimits(vocab_size=50, context_limit=256))
    assert err.value.field_name == field, err.value


def test_logit_bias_keys_must_be_token_ids():
    limits = ModelLimits(vocab_size=50, context_limit=256)
    with pytest.raises(InvalidRequest) as err:
        limits.check([1, 2], SamplingParams(logit_bias={50: 1.0}))
    assert err.value.field_name == "logit_bias"


# ---- the server: HTTP (openai package, httpx) and gRPC ---------------------------------------------
SERVED = "smollm2"
TEXT = "The three primary colors are"
MESSAGES = [{"role": "user", "content": "Name a large ocean."}]


@pytest.fixture(scope="module")
def server(smollm2_http_server):
    return smollm2_http_server


def _grpc(stub, **kw):
    from pop_disagg._proto import generation_pb2 as pb

    bias = kw.pop("logit_bias", {})
    msg = pb.GenerateRequest(**kw)
    msg.logit_bias.update(bias)
    return stub.Generate(msg, timeout=120)


def test_completion_logprobs_equal_grpc(oa, stub, server):
    tok = server.deployment.tokenizer
    ref = _grpc(stub, prompt=TEXT, max_new_tokens=8, logprobs=3)
    assert len(ref.logprobs) == len(ref.token_ids) == 8
    got = oa.completions.create(model=SERVED, prompt=TEXT, max_tokens=8, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs  # the SDK's own Logprobs type
    assert lp.tokens == [tok.decode([t]) for t in ref.token_ids]
    assert lp.token_logprobs == pytest.approx([x.logprob for x in ref.logprobs], abs=1e-5)
    for i, x in enumerate(ref.logprobs):
        assert [t.token_id for t in x.top_logprobs] and x.top_logprobs[0].token_id == x.token_id  # greedy: top-1
        want = {tok.decode([t.token_id]): t.logprob for t in x.top_logprobs}
        assert set(lp.top_logprobs[i]) >= set(want) and len(lp.top_logprobs[i]) <= 4
        assert lp.token_logprobs[i] <= 0
    assert lp.text_offset == [sum(len(s) for s in lp.tokens[:i]) for i in range(len(lp.tokens))]
    # Streaming: the same numbers, chunk by chunk, offsets carried across chunks.
    chunks = list(
        oa.completions.create(model=SERVED, prompt=TEXT, max_tokens=8, temperature=0, logprobs=3, stream=True)
    )
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs and c.choices[0].logprobs.tokens]
    assert [t for c in streamed for t in c.tokens] == lp.tokens
    assert [v for c in streamed for v in c.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert [o for c in streamed for o in c.text_offset] == lp.text_offset


def test_chat_logprobs_streaming_and_not(oa, stub, server):
    got = oa.chat.completions.create(
        model=SERVED, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    content = got.choices[0].logprobs.content  # list[ChatCompletionTokenLogprob]
    assert len(content) == got.usage.completion_tokens
    assert "".join(c.token for c in content).strip() == got.choices[0].message.content.strip()
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-6)
        assert c.bytes == list(c.token.encode())
    stream = oa.chat.completions.create(
        model=SERVED, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2, stream=True
    )
    streamed = [x for ch in stream if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.content]
    assert [x.token for x in streamed] == [c.token for c in content]
    assert [x.logprob for x in streamed] == pytest.approx([c.logprob for c in content], abs=1e-5)
    # Without top_logprobs: the sampled token's logprob only; sampled rows too.
    plain = oa.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=4, logprobs=True, seed=3)
    assert all(c.top_logprobs == [] and c.logprob <= 0 for c in plain.choices[0].logprobs.content)
    none = oa.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=2)
    assert none.choices[0].logprobs is None


def test_penalties_over_http_equal_grpc(oa, stub):
    opts = dict(repetition_penalty=1.6, frequency_penalty=0.8, presence_penalty=0.4, min_tokens=5)
    ref = _grpc(stub, prompt=TEXT, max_new_tokens=16, logit_bias={28: -100.0}, **opts)
    plain = _grpc(stub, prompt=TEXT, max_new_tokens=16)
    assert list(ref.token_ids) != list(plain.token_ids) and 28 not in ref.token_ids
    got = oa.completions.create(
        model=SERVED,
        prompt=TEXT,
        max_tokens=16,
        temperature=0,
        frequency_penalty=0.8,
        presence_penalty=0.4,
        logit_bias={"28": -100},
        extra_body={"repetition_penalty": 1.6, "min_tokens": 5, "return_token_ids": True},
    )
    assert got.choices[0].token_ids == list(ref.token_ids) and got.choices[0].text == ref.text


def test_skip_special_tokens(http, server):
    eos = server.deployment.tokenizer.eos_token_id
    body = {"model": SERVED, "prompt": TEXT, "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    body["logit_bias"] = {str(eos): 100}  # EOS is certain: the text is all special tokens
    skipped = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    kept = http.post("/v1/completions", json={**body, "skip_special_tokens": False}).json()["choices"][0]["text"]
    assert skipped == "" and kept == server.deployment.tokenizer.decode([eos, eos])


def test_continuous_usage_stats(http):
    import json

    body = {"model": SERVED, "prompt": TEXT, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    with http.stream("POST", "/v1/completions", json=body) as resp:
        events = [line.removeprefix("data: ") for line in resp.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and all(c["usage"] is not None for c in chunks)
    counts = [c["usage"]["completion_tokens"] for c in chunks if c["choices"]]
    assert counts == sorted(counts) and counts[-1] == 5 == chunks[-1]["usage"]["completion_tokens"]
    assert all(
        c["usage"]["total_tokens"] == c["usage"]["prompt_tokens"] + c["usage"]["completion_tokens"] for c in chunks
    )


def test_tokenize_detokenize_version(http, oa, server):
    tok = server.deployment.tokenizer
    got = http.post("/tokenize", json={"model": SERVED, "prompt": TEXT}).json()
    assert got == {"count": len(tok.encode(TEXT)), "max_model_len": 512, "tokens": tok.encode(TEXT)}
    strs = http.post("/tokenize", json={"prompt": TEXT, "return_token_strs": True}).json()["token_strs"]
    assert strs == tok.convert_ids_to_tokens(tok.encode(TEXT))
    chat = http.post("/tokenize", json={"messages": MESSAGES}).json()
    reply = oa.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=1)
    assert chat["count"] == reply.usage.prompt_tokens == len(chat["tokens"])
    assert http.post("/detokenize", json={"tokens": got["tokens"]}).json() == {"prompt": TEXT}
    version = http.get("/version")
    assert version.status_code == 200 and isinstance(version.json()["version"], str)
    bad = http.post("/detokenize", json={"tokens": [1, 10**7]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    wrong = http.post("/tokenize", json={"model": "gpt-4", "prompt": "x"})
    assert wrong.status_code == 404 and wrong.json()["error"]["code"] == "model_not_found"


def test_ignored_unknown_and_neutral_fields_are_accepted(http, caplog):
    import logging

    body = {"model": SERVED, "prompt": "Hi", "max_tokens": 2, "temperature": 0}
    ref = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    extra = {"user": "u1", "service_tier": "auto", "spaces_between_special_tokens": False, "tools": [], "suffix": None}
    extra |= {"frobnicate": 1, "add_special_tokens": True, "echo": False}  # unknown (vLLM: warned), neutral
    with caplog.at_level(logging.WARNING, logger="pop_disagg.serve"):
        for _ in range(2):
            resp = http.post("/v1/completions", json={**body, **extra})
            assert resp.status_code == 200, resp.text
            assert resp.json()["choices"][0]["text"] == ref  # ignoring them changed nothing
        chat = {"model": SERVED, "messages": MESSAGES, "max_tokens": 2, "add_special_tokens": False}
        chat |= {"add_generation_prompt": True, "continue_final_message": False, "echo": False, "temprature": 0.5}
        assert http.post("/v1/chat/completions", json=chat).status_code == 200
    warned = [r.getMessage() for r in caplog.records if "accepted and ignored" in r.getMessage()]
    assert sum("'service_tier'" in w for w in warned) == 1  # once per field name, per process
    assert sum("'frobnicate'" in w and "not a parameter" in w for w in warned) == 1
    assert any("'temprature'" in w for w in warned)  # a misspelt option is named in the log


def test_warned_names_are_bounded(monkeypatch):
    from pop_disagg.server.frontend import openai_fields

    monkeypatch.setattr(openai_fields, "_warned", set())
    openai_fields.check_extra({f"x{i}": 1 for i in range(openai_fields.MAX_WARNED_NAMES + 50)})
    assert len(openai_fields._warned) == openai_fields.MAX_WARNED_NAMES


REFUSALS = [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logprobs": 21}, "logprobs"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"suffix": "x"}, "suffix"),
    ({"include_stop_str_in_output": True}, "include_stop_str_in_output"),
    ({"add_special_tokens": False}, "add_special_tokens"),
    ({"min_p": 0.1}, "min_p"),
]
CHAT_REFUSALS = [
    ({"logprobs": True, "top_logprobs": 25}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"echo": True}, "echo"),
    ({"continue_final_message": True}, "continue_final_message"),
    ({"add_special_tokens": True}, "add_special_tokens"),
]


@pytest.mark.parametrize(
    "path,extra,param",
    [("/v1/completions", *r) for r in REFUSALS] + [("/v1/chat/completions", *r) for r in CHAT_REFUSALS],
)
def test_bad_values_name_the_parameter(http, path, extra, param):
    prompt = {"messages": MESSAGES} if "chat" in path else {"prompt": "Hi"}
    for stream in (False, True):
        resp = http.post(path, json={"model": SERVED, "max_tokens": 4, "stream": stream, **prompt, **extra})
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert err["param"] == param and err["message"].startswith(param) and err["type"] == "invalid_request_error"
    ok = http.post("/v1/completions", json={"model": SERVED, "prompt": "Hi", "max_tokens": 2, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_n_samples_unary_and_streaming(oa, stub):
    import openai

    seeded = dict(temperature=1.0, top_p=0.95, seed=21, max_tokens=8)
    got = oa.completions.create(model=SERVED, prompt=TEXT, n=3, extra_body={"return_token_ids": True}, **seeded)
    assert [c.index for c in got.choices] == [0, 1, 2]
    # Sample i is the seeded request with seed + i: the same tokens gRPC gives for that seed.
    for c in got.choices:
        ref = _grpc(stub, prompt=TEXT, max_new_tokens=8, temperature=1.0, top_p=0.95, seed=21 + c.index)
        assert c.token_ids == list(ref.token_ids) and c.text == ref.text
    assert got.usage.completion_tokens == sum(len(c.token_ids) for c in got.choices)
    assert got.usage.prompt_tokens == _grpc(stub, prompt=TEXT, max_new_tokens=1).usage.prompt_tokens
    stream = oa.completions.create(
        model=SERVED, prompt=TEXT, n=3, stream=True, stream_options={"include_usage": True}, **seeded
    )
    texts, finished = ["", "", ""], set()
    chunks = list(stream)
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finished.add(c.index)
    assert texts == [c.text for c in got.choices] and finished == {0, 1, 2}
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens
    chat = oa.chat.completions.create(model=SERVED, messages=MESSAGES, n=2, max_tokens=4, seed=1, logprobs=True)
    assert [c.index for c in chat.choices] == [0, 1] and all(c.logprobs.content for c in chat.choices)
    with pytest.raises(openai.BadRequestError) as err:
        oa.completions.create(model=SERVED, prompt=TEXT, n=2, best_of=3)
    assert err.value.param == "best_of"


def test_grpc_stream_carries_logprobs_per_message(stub):
    from pop_disagg._proto import generation_pb2 as pb

    unary = _grpc(stub, prompt=TEXT, max_new_tokens=6, logprobs=2)
    msgs = list(stub.GenerateStream(pb.GenerateRequest(prompt=TEXT, max_new_tokens=6, logprobs=2), timeout=120))
    assert all(len(m.logprobs) == len(m.token_ids) for m in msgs)
    streamed = [lp for m in msgs for lp in m.logprobs]
    assert [lp.token_id for lp in streamed] == list(unary.token_ids)
    assert [lp.logprob for lp in streamed] == pytest.approx([lp.logprob for lp in unary.logprobs], abs=1e-5)
    assert all(len(lp.top_logprobs) == 2 for lp in streamed)
    assert not _grpc(stub, prompt=TEXT, max_new_tokens=2).logprobs  # not asked: none
