"""Structured output in the engine (``engine/structured.py``): a grammar masks every sampled step.

On a tiny random checkpoint (its tokens are noise, so only the mask makes the text parse): a
choice, a bounded JSON schema and a regex give text in their language for greedy and sampled
decoding, ending on EOS; batched with free-text requests, which keep their tokens; the masked
step equals the raw logits with the forbidden tokens at -inf; bad specs and impossible
combinations are refused naming the field.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from pop_disagg.config import EngineConfig, PruneConfig
from pop_disagg.engine.engine import LLMEngine
from pop_disagg.engine.sampling import SamplingParams
from pop_disagg.engine.structured import StructuredSpec
from pop_disagg.limits import InvalidRequest
from pop_disagg.models.loader import load_model

PROMPTS = [[5, 9, 13, 40, 41], [7, 88, 120, 3], [19, 51, 77, 23, 8, 64]]
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
    "required": ["ok", "color"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    path = tiny_ckpt("llama")
    cfg = EngineConfig(model=path, kv_cache_memory_mb=8, block_size=4, prune=PruneConfig())  # POP
    return LLMEngine(cfg, model=load_model(path), model_path=path)


def _texts(engine, spec, **sampling):
    params = SamplingParams(max_new_tokens=48, structured=spec, **sampling)
    outs = engine.generate(PROMPTS, params)
    assert all(o.finish_reason == "stop" for o in outs), [o.token_ids for o in outs]
    return [engine.tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outs]


SAMPLED = [dict(), dict(temperature=1.0, seed=3), dict(temperature=1.5, top_p=0.9, seed=11)]


@pytest.mark.parametrize("sampling", SAMPLED)
def test_choice(engine, sampling):
    choices = ["alpha", "beta gamma", 'quote " and \\ slash']
    spec = StructuredSpec(kind="choice", value=json.dumps(choices))
    assert all(t in choices for t in _texts(engine, spec, **sampling))


@pytest.mark.parametrize("sampling", SAMPLED)
def test_json_schema(engine, sampling):
    import jsonschema

    spec = StructuredSpec(kind="json_schema", value=json.dumps(SCHEMA))
    for text in _texts(engine, spec, **sampling):
        jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("sampling", SAMPLED)
def test_regex(engine, sampling):
    pattern = r"[a-c]{2,4}-[0-9]{3}"
    spec = StructuredSpec(kind="regex", value=pattern)
    assert all(re.fullmatch(pattern, t) for t in _texts(engine, spec, **sampling))


def test_free_text_requests_keep_their_tokens(engine):
    free = SamplingParams(max_new_tokens=6, ignore_eos=True)
    alone = engine.generate(PROMPTS[:2], free)
    spec = StructuredSpec(kind="choice", value=json.dumps(["yes", "no"]))
    mixed = engine.generate(PROMPTS[:2] + PROMPTS[:1], [free, free, SamplingParams(max_new_tokens=8, structured=spec)])
    assert [o.token_ids for o in mixed[:2]] == [o.token_ids for o in alone]


def test_mask_is_the_grammar_on_raw_logits(engine):
    """The first step's masked row: raw logits where the grammar allows the token, -inf elsewhere;
    the allowed set is exactly the tokens that start a choice."""
    from pop_disagg.engine import structured

    spec = StructuredSpec(kind="choice", value=json.dumps(["yes", "no"]))
    matcher = engine._grammar(SamplingParams(structured=spec))
    raw = torch.randn(2, engine.arch.vocab_size)
    req = type("R", (), {"grammar": matcher})()
    free = type("R", (), {"grammar": None})()
    out = structured.mask_logits(raw, [free, req])
    assert torch.equal(out[0], raw[0])
    allowed = torch.isfinite(out[1])
    assert torch.equal(out[1][allowed], raw[1][allowed])
    tok = engine.tokenizer
    want = {
        t
        for t in range(len(tok))
        if tok.decode([t]) and ("yes".startswith(tok.decode([t])) or "no".startswith(tok.decode([t])))
    }
    assert set(allowed.nonzero()[:, 0].tolist()) == want


def test_refusals_name_the_field(engine):
    with pytest.raises(InvalidRequest, match="^structured"):
        engine.add_request(
            PROMPTS[0], SamplingParams(structured=StructuredSpec(kind="json_schema", value='{"type": 5}'))
        )
    with pytest.raises(InvalidRequest, match="^structured"):
        engine.add_request(PROMPTS[0], SamplingParams(structured=StructuredSpec(kind="regex", value="a(")))
    with pytest.raises(InvalidRequest, match="^structured"):
        engine.add_request(PROMPTS[0], SamplingParams(structured=StructuredSpec(kind="choice", value="[]")))
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, structured=StructuredSpec(kind="json_object"))
    assert not engine.has_unfinished()
