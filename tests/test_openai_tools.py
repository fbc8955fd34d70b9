"""The OpenAI API as evaluation and benchmark tools call it, on a live 1P1D POP server (SmolLM2).

Prompt scoring (completions ``echo`` + ``logprobs``): the ``full`` mode's prompt logprobs equal
Transformers' own log-softmax over the whole sequence; the ``pop`` mode's continuation logprobs
equal Transformers' model over the POP reference prefill of the context (``pop_reference.py``);
batched token-id prompts as lm-eval sends them; ``max_tokens: 0``; streaming equals unary; the
``openai`` package parses it; bad values are 400s naming the field and the server keeps serving.
"""

from __future__ import annotations

import pytest
import torch

from .pop_reference import hf_pop_prefill

SERVED = "smollm2"
CONTEXT = "Question: What is the capital of France?\nAnswer:"
CONTINUATION = " The capital of France is Paris."
TOL = 2e-3  # float32, 30 layers, different kernels (our GEMMs vs Transformers'): measured < 1e-4


@pytest.fixture(scope="module")
def server(smollm2_http_server):
    return smollm2_http_server


@pytest.fixture(scope="module")
def hf(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval(), AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def ids(hf):
    tok = hf[1]
    return tok.encode(CONTEXT), tok.encode(CONTEXT + CONTINUATION)


@torch.no_grad()
def _full_logprobs(model, prompt: list[int]) -> list[float]:
    lp = model(torch.tensor([prompt])).logits[0, :-1].double().log_softmax(-1)
    return [float(lp[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]


@torch.no_grad()
def _pop_logprobs(model, prompt: list[int], num_context: int, skip: set[int]) -> list[float]:
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, (k, v) in enumerate(hf_pop_prefill(model, prompt[:num_context], skip)):
        cache.update(k, v, layer)
    rest = prompt[num_context - 1 : -1]
    pos = torch.arange(num_context - 1, len(prompt) - 1)[None]
    lp = model(torch.tensor([rest]), past_key_values=cache, position_ids=pos, use_cache=True).logits[0]
    lp = lp.double().log_softmax(-1)
    return [float(lp[i, prompt[num_context + i]]) for i in range(len(rest))]


def _score(http, prompt, **extra) -> dict:
    body = {"model": SERVED, "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    resp = http.post("/v1/completions", json={**body, **extra})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_full_mode_scores_equal_transformers(http, hf, ids):
    model, tok = hf
    ctx, whole = ids
    # lm-eval's loglikelihood request: token ids, a batch (list of lists), max_tokens 1.
    got = _score(http, [whole, ctx])
    assert [c["index"] for c in got["choices"]] == [0, 1]
    for choice, prompt in zip(got["choices"], [whole, ctx]):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(prompt) + 1  # the prompt, then the generated token
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:-1] == pytest.approx(_full_logprobs(model, prompt), abs=TOL)
        assert lp["tokens"][: len(prompt)] == [tok.decode([t]) for t in prompt]
        for value, top in zip(lp["token_logprobs"][1:-1], lp["top_logprobs"][1:-1]):
            assert value in top.values() and len(top) <= 2
        assert choice["text"].startswith(tok.decode(prompt))
    assert got["usage"]["prompt_tokens"] == len(whole) + len(ctx) and got["usage"]["completion_tokens"] == 2
    # max_tokens 0: the prompt alone, same numbers, no completion.
    alone = _score(http, CONTEXT + CONTINUATION, max_tokens=0)["choices"][0]
    assert alone["text"] == CONTEXT + CONTINUATION and alone["finish_reason"] == "length"
    assert alone["logprobs"]["token_logprobs"] == pytest.approx(got["choices"][0]["logprobs"]["token_logprobs"][:-1])


def test_pop_mode_scores_the_continuation_after_a_pop_context(http, hf, server, ids):
    model, _ = hf
    ctx, whole = ids
    skip = set(server.deployment.family.default_plan.skip_layers)
    assert skip  # the server prefills with POP
    got = _score(http, whole, prompt_logprobs_mode="pop", num_context_tokens=len(ctx))["choices"][0]["logprobs"]
    values = got["token_logprobs"]
    assert values[: len(ctx)] == [None] * len(ctx)  # the context is not scored
    want = _pop_logprobs(model, whole, len(ctx), skip)
    assert values[len(ctx) : -1] == pytest.approx(want, abs=TOL)
    # It differs from the full model's reading of the same tokens (the context was pruned).
    full = _full_logprobs(model, whole)[len(ctx) - 1 :]
    assert max(abs(a - b) for a, b in zip(values[len(ctx) : -1], full)) > 1e-3


def test_streamed_echo_equals_unary(http, ids):
    import json

    body = {"model": SERVED, "prompt": ids[1], "echo": True, "logprobs": 2, "max_tokens": 4, "temperature": 0}
    unary = http.post("/v1/completions", json=body).json()["choices"][0]
    text, values = "", []
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                values += choice["logprobs"]["token_logprobs"] if choice["logprobs"] else []
    assert text == unary["text"]
    assert values == pytest.approx(unary["logprobs"]["token_logprobs"], abs=1e-6)


def test_openai_sdk_parses_echo_logprobs(oa, ids):
    got = oa.completions.create(model=SERVED, prompt=CONTEXT, echo=True, logprobs=1, max_tokens=0, temperature=0)
    lp = got.choices[0].logprobs  # the SDK's own Logprobs type
    assert got.choices[0].text == CONTEXT and lp.token_logprobs[0] is None
    assert len(lp.tokens) == len(ids[0]) and all(v < 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset == [sum(len(s) for s in lp.tokens[:i]) for i in range(len(lp.tokens))]


BAD = [
    ({"prompt_logprobs_mode": "full"}, "prompt_logprobs_mode"),  # without echo + logprobs
    ({"echo": True, "logprobs": 1, "prompt_logprobs_mode": "pop"}, "num_context_tokens"),
    ({"echo": True, "logprobs": 1, "num_context_tokens": 2}, "num_context_tokens"),
    ({"echo": True, "logprobs": 1, "prompt_logprobs_mode": "pop", "num_context_tokens": 0}, "num_context_tokens"),
    ({"echo": True, "logprobs": 1, "prompt_logprobs_mode": "pop", "num_context_tokens": 999}, "num_context_tokens"),
    ({"echo": True, "logprobs": 1, "prompt_logprobs_mode": "half"}, "prompt_logprobs_mode"),
    ({"max_tokens": 0}, "max_tokens"),  # only an echo may ask for nothing
    ({"prompt": [[1, 2]] * 65}, "prompt"),
]


@pytest.mark.parametrize("extra,param", BAD)
def test_bad_scoring_values_name_the_field(http, extra, param):
    resp = http.post("/v1/completions", json={"model": SERVED, "prompt": "Hi there", "max_tokens": 1, **extra})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and err["message"].startswith(param), err
    ok = http.post("/v1/completions", json={"model": SERVED, "prompt": "Hi", "max_tokens": 1})
    assert ok.status_code == 200


def test_scoring_under_an_ablation_plan_is_refused_naming_echo():
    from pop_disagg.engine.sampling import SamplingParams
    from pop_disagg.limits import InvalidRequest, ModelLimits
    from pop_disagg.server.frontend.http_api import CompletionRequest
    from pop_disagg.server.frontend.scoring import scoring_params

    req = CompletionRequest(model=SERVED, prompt=[1, 2, 3], echo=True, logprobs=1)
    with pytest.raises(InvalidRequest, match="^echo: prompt scoring is not served under an ablation"):
        scoring_params(req, SamplingParams(), 3, ModelLimits(100, 64, can_score_prompt=False))
    assert scoring_params(req, SamplingParams(), 3, ModelLimits(100, 64)).prompt_logprobs == 1


# ---- structured output ---------------------------------------------------------------------------
PET = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "species": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
    },
    "required": ["name", "species", "age"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a pet as JSON with its name, species and age."}]


@pytest.mark.parametrize(
    "sampling", [dict(temperature=0), dict(temperature=1.0, seed=7), dict(temperature=1.3, top_p=0.95, seed=2)]
)
def test_json_schema_output_validates(oa, sampling):
    import json

    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET, "strict": True}}
    got = oa.chat.completions.create(model=SERVED, messages=ASK, max_tokens=80, n=2, response_format=fmt, **sampling)
    for choice in got.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PET)


def test_openai_sdk_parses_into_its_types(oa):
    """The SDK's own structured-output call: a pydantic model in, ``message.parsed`` out."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        name: str = Field(max_length=12)
        species: Literal["cat", "dog", "bird"]
        age: int = Field(ge=0, le=30)

    got = oa.chat.completions.parse(model=SERVED, messages=ASK, max_tokens=80, temperature=0, response_format=Pet)
    assert isinstance(got.choices[0].message.parsed, Pet)
    # logprobs and n through the SDK's types on the same call shape.
    got = oa.chat.completions.create(model=SERVED, messages=ASK, max_tokens=8, n=2, logprobs=True, top_logprobs=2)
    assert len(got.choices) == 2 and all(len(c.logprobs.content[0].top_logprobs) == 2 for c in got.choices)


def test_json_object_and_vllm_extensions(http):
    import json
    import re

    def complete(**extra):
        body = {"model": SERVED, "prompt": "A JSON object about the sun:", "max_tokens": 60, "temperature": 0}
        resp = http.post("/v1/completions", json={**body, **extra})
        assert resp.status_code == 200, resp.text
        return resp.json()["choices"][0]

    short = [{"role": "user", "content": "Give a short JSON object with a name and an age."}]
    body = {"model": SERVED, "messages": short, "max_tokens": 100, "response_format": {"type": "json_object"}}
    for sampling in (dict(temperature=0), dict(temperature=0.7, seed=1)):
        c = http.post("/v1/chat/completions", json={**body, **sampling}).json()["choices"][0]
        assert c["finish_reason"] == "stop" and isinstance(json.loads(c["message"]["content"]), dict)
    for extra in ({"guided_choice": ["hot", "cold"]}, {"structured_outputs": {"choice": ["hot", "cold"]}}):
        assert complete(**extra)["text"] in ("hot", "cold")
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}", complete(guided_regex=r"[0-9]{4}-[0-9]{2}")["text"])
    assert re.fullmatch(r"[0-9]{3}", complete(structured_outputs={"regex": r"[0-9]{3}"})["text"])
    obj = json.loads(complete(guided_json=PET)["text"])
    assert set(obj) == {"name", "species", "age"}
    assert complete(guided_grammar='root ::= "yes" | "no"')["text"] in ("yes", "no")


STRUCTURED_BAD = [
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}},
        "response_format",
    ),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"guided_regex": "a("}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"structured_outputs": {"choice": ["a"], "regex": "b"}}, "structured_outputs"),
    ({"structured_outputs": {"yaml": "x"}}, "structured_outputs"),
    ({"response_format": {"type": "json_object"}, "guided_choice": ["a"]}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "response_format"),
    ({"guided_choice": ["a", "b"], "min_tokens": 2}, "guided_choice"),
]


@pytest.mark.parametrize("extra,param", STRUCTURED_BAD)
def test_bad_structured_output_names_the_field(http, extra, param):
    for path, prompt in (("/v1/completions", {"prompt": "Hi"}), ("/v1/chat/completions", {"messages": ASK})):
        resp = http.post(path, json={"model": SERVED, "max_tokens": 4, **prompt, **extra})
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert err["param"] == param and err["message"].startswith(param), err
    ok = http.post("/v1/completions", json={"model": SERVED, "prompt": "Hi", "max_tokens": 1})
    assert ok.status_code == 200


# ---- lm-evaluation-harness against the server ----------------------------------------------------
LM_EVAL_TOL = 2e-3  # per-choice log-likelihood, served vs in-process (float32 kernels differ)


def _lm_eval(model: str, model_args: str, task: str, limit: int, monkeypatch) -> dict:
    import pathlib

    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(pathlib.Path(__file__).resolve().parents[1])  # the task YAMLs name data from the root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tm = TaskManager(include_path="tests/data/lm_eval", include_defaults=False)
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=[task], task_manager=tm, limit=limit, log_samples=True
    )


def _served_args(server, smollm2_dir) -> str:
    url = f"{server.http_url}/v1/completions"
    return f"model={SERVED},base_url={url},tokenizer={smollm2_dir},tokenizer_backend=huggingface,max_retries=1"


def test_lm_eval_loglikelihood_equals_hf(server, smollm2_dir, monkeypatch):
    """lm-eval's local-completions on the POP server (prompt scoring on the full model, the default)
    == lm-eval's own in-process HF model: every choice's log-likelihood, hence the accuracy."""
    served = _lm_eval("local-completions", _served_args(server, smollm2_dir), "pop_mc", 8, monkeypatch)
    hf = _lm_eval("hf", f"pretrained={smollm2_dir},dtype=float32,device=cpu", "pop_mc", 8, monkeypatch)
    for a, b in zip(served["samples"]["pop_mc"], hf["samples"]["pop_mc"]):
        assert a["doc_id"] == b["doc_id"]
        assert [r[0][0] for r in a["resps"]] == pytest.approx([r[0][0] for r in b["resps"]], abs=LM_EVAL_TOL)
    for metric in ("acc,none", "acc_norm,none"):
        assert served["results"]["pop_mc"][metric] == hf["results"]["pop_mc"][metric]


def test_lm_eval_generate_until_equals_the_engine(server, smollm2_dir, monkeypatch):
    """generate_until (greedy) on the POP server == lm-eval's in-process ``pop-disagg`` model with
    the server's plan: the same answers, the same exact-match score."""
    import lm_eval.models  # noqa: F401  (the harness's own model types, before ours joins the registry)

    import pop_disagg.eval.lm_eval_adapter  # noqa: F401  (registers the model type)

    skip = ";".join(str(i) for i in server.deployment.family.default_plan.skip_layers)
    served = _lm_eval("local-completions", _served_args(server, smollm2_dir), "pop_gen", 6, monkeypatch)
    local = _lm_eval("pop-disagg", f"model={smollm2_dir},skip_layers={skip}", "pop_gen", 6, monkeypatch)
    assert [s["resps"] for s in served["samples"]["pop_gen"]] == [s["resps"] for s in local["samples"]["pop_gen"]]
    key = "exact_match,none"
    assert served["results"]["pop_gen"][key] == local["results"]["pop_gen"][key]


# ---- fuzzing the new request fields --------------------------------------------------------------
def _bodies():
    from hypothesis import strategies as st

    text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=12)
    ints = st.one_of(st.integers(-2, 12), st.integers(-(2**40), 2**40))
    ids = st.lists(st.integers(0, 49151), min_size=1, max_size=6)
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers(-5, 5) | text,
        lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3),
        max_leaves=6,
    )
    fields = {
        "echo": st.booleans(),
        "logprobs": st.one_of(st.integers(-1, 22), st.none()),
        "max_tokens": st.integers(-1, 6),
        "n": st.integers(0, 3),
        "prompt_logprobs_mode": st.sampled_from(["full", "pop", "POP", "", "both"]),
        "num_context_tokens": ints,
        "response_format": st.one_of(
            st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "yaml"])}),
            st.fixed_dictionaries(
                {
                    "type": st.just("json_schema"),
                    "json_schema": st.fixed_dictionaries({"name": text, "schema": json_values}),
                }
            ),
            json_values,
        ),
        "guided_choice": st.one_of(st.lists(text, max_size=3), json_values),
        "guided_regex": st.one_of(st.sampled_from(["[a-c]{1,3}", "a(", "x|y", "[z-a]", "\\d{2}"]), text),
        "guided_json": json_values,
        "guided_grammar": st.one_of(st.sampled_from(['root ::= "a" | "b"', "root ::= x"]), text),
        "structured_outputs": st.one_of(
            st.dictionaries(st.sampled_from(["choice", "regex", "json", "yaml"]), json_values, max_size=2), json_values
        ),
    }

    @st.composite
    def body(draw):
        is_chat = draw(st.booleans())
        b = {"model": SERVED, "temperature": draw(st.sampled_from([0, 0.8])), "seed": 1}
        if is_chat:
            b["messages"] = [{"role": "user", "content": draw(text) or "hi"}]
        else:
            b["prompt"] = draw(st.one_of(text, ids, st.lists(ids, min_size=1, max_size=3)))
        for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=4, unique=True)):
            if not (is_chat and name in ("echo", "prompt_logprobs_mode", "num_context_tokens")):
                b[name] = draw(fields[name])
        b.setdefault("max_tokens", 4)
        return "/v1/chat/completions" if is_chat else "/v1/completions", b

    return body()


def test_fuzzed_new_fields_get_an_answer_or_a_400_naming_one(http):
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(case=_bodies())
    def run(case):
        path, body = case
        resp = http.post(path, json=body)
        if resp.status_code == 400:
            err = resp.json()["error"]
            assert err["param"] is not None and err["message"].startswith(err["param"]), (body, err)
            assert err["param"].split("[")[0].split(".")[0] in body, (body, err)
            return
        assert resp.status_code == 200, (body, resp.status_code, resp.text)
        out = resp.json()
        num_prompts = (
            len(body["prompt"]) if isinstance(body.get("prompt"), list) and isinstance(body["prompt"][0], list) else 1
        )
        assert len(out["choices"]) == num_prompts * body.get("n", 1)
        if body.get("echo") and body.get("logprobs") is not None and "prompt" in body:
            assert all(c["logprobs"]["token_logprobs"][0] is None for c in out["choices"])

    run()
    ok = http.post("/v1/completions", json={"model": SERVED, "prompt": "Hi", "max_tokens": 2, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
