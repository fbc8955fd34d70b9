"""Prompt scoring (``engine/prompt_logprobs.py``): prompt logprobs equal Transformers' own.

Engine level, tiny checkpoints under a POP plan: ``num_context_tokens`` 1 (the full-model path)
gives every prompt token after the first the log-softmax of Transformers' full forward; a context of
C tokens gives the tokens after it the log-softmax of Transformers' model over the POP reference
prefill of the context (``pop_reference.py``), the context itself unscored. Whole-prompt and
chunked steps, the prefix cache on, a scoring request batched with generation requests (which keep
their tokens), preemption (scores once, unchanged), refusals naming the field.
"""

from __future__ import annotations

import functools

import pytest
import torch

from pop_disagg.config import EngineConfig, PruneConfig
from pop_disagg.engine.engine import LLMEngine
from pop_disagg.engine.sampling import SamplingParams
from pop_disagg.limits import InvalidRequest
from pop_disagg.models.loader import load_model

from .pop_reference import hf_pop_prefill

PROMPT = [5, 9, 13, 40, 41, 42, 7, 88, 120, 3, 77, 51, 19]


@functools.cache
def _model(path: str):
    return load_model(path)


def _engine(path, chunked=False, caching=False, num_blocks=None, **prune):
    model = _model(path)
    mb = 8.0 if num_blocks is None else num_blocks * model.arch.kv_bytes_per_token(4) * 4 / 2**20
    cfg = EngineConfig(
        model=path,
        prune=PruneConfig(**prune),
        kv_cache_memory_mb=mb,
        block_size=4,
        max_num_batched_tokens=8 if chunked else 64,
        enable_chunked_prefill=chunked,
        enable_prefix_caching=caching,
    )
    return LLMEngine(cfg, model=model, model_path=path)


@functools.cache
def _hf(path: str):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


@torch.no_grad()
def _full_reference(path, prompt) -> torch.Tensor:
    """(N-1, V): Transformers' log-softmax of token i+1's distribution at position i."""
    return _hf(path)(torch.tensor([prompt])).logits[0, :-1].double().log_softmax(-1)


@torch.no_grad()
def _pop_reference(path, prompt, num_context, skip) -> torch.Tensor:
    """(N - C, V): the context through the POP reference prefill (its last token the boundary, on
    the full model), the rest teacher-forced by Transformers' full model over that cache."""
    from transformers import DynamicCache

    model = _hf(path)
    cache = DynamicCache()
    if num_context > 1:
        for layer, (k, v) in enumerate(hf_pop_prefill(model, prompt[:num_context], skip)):
            cache.update(k, v, layer)
    rest = prompt[num_context - 1 : -1]
    pos = torch.arange(num_context - 1, len(prompt) - 1)[None]
    logits = model(torch.tensor([rest]), past_key_values=cache, position_ids=pos, use_cache=True).logits[0]
    return logits.double().log_softmax(-1)


def _assert_scores(scores, ref, first_scored, prompt, k):
    assert len(scores) == len(prompt)
    assert all(s is None for s in scores[:first_scored])
    for i in range(first_scored, len(prompt)):
        row, s = ref[i - first_scored], scores[i]
        assert s.token_id == prompt[i]
        assert s.logprob == pytest.approx(float(row[prompt[i]]), abs=1e-4)
        top_v, top_i = row.topk(k)
        assert [t for t, _ in s.top] == top_i.tolist()
        assert [v for _, v in s.top] == pytest.approx(top_v.tolist(), abs=1e-4)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("caching", [False, True])
def test_full_mode_equals_transformers(tiny_ckpt, chunked, caching):
    path = tiny_ckpt("llama")
    eng = _engine(path, chunked=chunked, caching=caching)  # the default POP plan: the last third skipped
    assert eng.plan.skip_layers
    plain = SamplingParams(max_new_tokens=5, ignore_eos=True)
    alone = eng.generate([PROMPT, PROMPT[:7]], plain)  # generation requests, POP, no scoring anywhere
    scored = SamplingParams(max_new_tokens=2, ignore_eos=True, prompt_logprobs=3, logprobs=1)
    outs = eng.generate([PROMPT, PROMPT, PROMPT[:7]], [plain, scored, plain])  # batched together
    assert [o.token_ids for o in (outs[0], outs[2])] == [a.token_ids for a in alone]
    assert outs[0].prompt_logprobs is None
    ref = _full_reference(path, PROMPT + outs[1].token_ids)
    _assert_scores(outs[1].prompt_logprobs, ref, 1, PROMPT, 3)
    # The request's first token also comes from the full model over its full-model prompt.
    assert outs[1].logprobs[0].logprob == pytest.approx(float(ref[len(PROMPT) - 1, outs[1].token_ids[0]]), abs=1e-4)


@pytest.mark.parametrize("num_context", [2, 6, len(PROMPT) - 1, len(PROMPT)])
@pytest.mark.parametrize("chunked", [False, True])
def test_pop_mode_equals_the_pop_reference(tiny_ckpt, arch, num_context, chunked):
    path = tiny_ckpt(arch)
    eng = _engine(path, chunked=chunked)
    params = SamplingParams(max_new_tokens=1, prompt_logprobs=2, num_context_tokens=num_context)
    out = eng.generate([PROMPT], params)[0]
    if num_context == len(PROMPT):  # nothing after the context: nothing scored
        assert out.prompt_logprobs == [None] * len(PROMPT)
        return
    ref = _pop_reference(path, PROMPT, num_context, set(eng.plan.skip_layers))
    _assert_scores(out.prompt_logprobs, ref, num_context, PROMPT, 2)


def test_preempted_scoring_request_keeps_its_scores(tiny_ckpt):
    """Three long requests in 12 blocks: the newest are preempted and recomputed; the scoring one's
    prompt is scored once, equal to an unpressured run's, and its tokens are too."""
    path = tiny_ckpt("llama")
    prompts = [PROMPT, PROMPT[::-1], PROMPT[2:]]
    params = [SamplingParams(max_new_tokens=14, ignore_eos=True, prompt_logprobs=1 if i else None) for i in range(3)]
    expected = _engine(path).generate(prompts, params)
    eng = _engine(path, num_blocks=12)
    got = eng.generate(prompts, params)
    assert eng.stats.num_preemptions > 0
    for a, b in zip(got, expected):
        assert a.token_ids == b.token_ids
        if b.prompt_logprobs is not None:
            assert [(x and x.token_id, x and round(x.logprob, 4)) for x in a.prompt_logprobs] == [
                (x and x.token_id, x and round(x.logprob, 4)) for x in b.prompt_logprobs
            ]


def test_refusals_name_the_field(tiny_ckpt):
    path = tiny_ckpt("llama")
    with pytest.raises(InvalidRequest, match="^num_context_tokens"):
        _engine(path).add_request(PROMPT[:3], SamplingParams(prompt_logprobs=0, num_context_tokens=4))
    ablation = _engine(path, boundary_handling=False)
    with pytest.raises(InvalidRequest, match="^prompt_logprobs"):
        ablation.add_request(PROMPT, SamplingParams(prompt_logprobs=0))
    ablation.add_request(PROMPT, SamplingParams())  # generation is still served there
