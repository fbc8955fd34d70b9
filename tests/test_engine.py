"""Single-process engine: scheduling, paged blocks, sampling, stop conditions, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError

from pop_disagg.config import EngineConfig, PruneConfig
from pop_disagg.engine.detokenizer import IncrementalDetokenizer
from pop_disagg.engine.engine import LLMEngine
from pop_disagg.engine.kv_cache import BlockManager
from pop_disagg.engine.sampling import SamplingParams, greedy_tokens, make_generator, sample
from pop_disagg.models.loader import load_model
from pop_disagg.pop.plan import PlanError, PrunePlan


@pytest.fixture
def engine(tiny_ckpt):
    path = tiny_ckpt("llama")
    cfg = EngineConfig(model=path, kv_cache_memory_mb=1, block_size=4, max_num_seqs=3)
    return LLMEngine(cfg, model=load_model(path), model_path=path)


def _greedy(n=8, **kw):
    return SamplingParams(max_new_tokens=n, ignore_eos=True, **kw)


def test_requests_join_and_leave_the_running_batch(engine):
    """Outputs do not depend on who else is in the batch, and capacity limits are respected."""
    prompts = [[5 + i, 9, 13 + i, 40, 41, 42][: 2 + i] for i in range(5)]
    alone = [engine.generate([p], _greedy(6 + i))[0].token_ids for i, p in enumerate(prompts)]
    for i, p in enumerate(prompts[:2]):
        engine.add_request(p, _greedy(6 + i), request_id=f"r{i}")
    finished, max_running = {}, 0
    for step in range(200):
        if step == 3:  # late arrivals join while the first two are decoding
            for i in range(2, 5):
                engine.add_request(prompts[i], _greedy(6 + i), request_id=f"r{i}")
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.token_ids
        max_running = max(max_running, len(engine.scheduler.running))
        if not engine.has_unfinished():
            break
    assert max_running == 3  # max_num_seqs
    assert [finished[f"r{i}"] for i in range(5)] == alone
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_kv_cache_sized_from_budget(tiny_ckpt):
    path = tiny_ckpt("llama")
    model = load_model(path)
    a = model.arch
    eng = LLMEngine(EngineConfig(model=path, kv_cache_memory_mb=2, block_size=8), model=model, model_path=path)
    per_block = 2 * a.num_layers * a.num_kv_heads * a.head_dim * 4 * 8
    assert eng.blocks.num_blocks == 2 * 2**20 // per_block
    assert eng.kv_cache.k.shape == (a.num_layers, a.num_kv_heads, eng.blocks.num_blocks, 8, a.head_dim)


def test_block_manager_accounting():
    bm = BlockManager(num_blocks=5, block_size=4)
    t = bm.allocate(9)  # 3 blocks
    assert len(t) == 3 and bm.num_free_blocks == 2
    assert bm.slots(t, 3, 6) == [t[0] * 4 + 3, t[1] * 4 + 0, t[1] * 4 + 1]
    assert not bm.can_allocate(12)
    bm.free(t)
    assert bm.num_free_blocks == 5


def test_waiting_requests_wait_for_blocks_and_oversized_is_rejected(tiny_ckpt):
    path = tiny_ckpt("llama")
    model = load_model(path)
    eng = LLMEngine(EngineConfig(model=path, kv_cache_memory_mb=0.5, block_size=16), model=model, model_path=path)
    total_tokens = eng.blocks.num_blocks * 16
    assert total_tokens + 20 < eng.context_limit
    with pytest.raises(ValueError, match="KV blocks"):
        eng.add_request([5] * 10, _greedy(total_tokens))
    # Two requests that each need more than half the cache run one after the other.
    half = total_tokens // 2 + 16
    outs = eng.generate([[5, 6, 7], [8, 9, 10]], [_greedy(half - 3), _greedy(half - 3)])
    assert all(len(o.token_ids) == half - 3 for o in outs)


def test_abort_frees_blocks(engine):
    rid = engine.add_request([5, 6, 7, 8, 9], _greedy(50))
    engine.step()
    engine.step()
    assert engine.blocks.num_free_blocks < engine.blocks.num_blocks
    assert engine.abort(rid)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert not engine.has_unfinished()


def test_stop_conditions(engine):
    base = engine.generate([[5, 6, 7]], _greedy(12))[0]
    # stop token id: finishes right at its first occurrence
    stop_tok = base.token_ids[4]
    first = base.token_ids.index(stop_tok)
    out = engine.generate([[5, 6, 7]], _greedy(12, stop_token_ids=(stop_tok,)))[0]
    assert out.token_ids == base.token_ids[: first + 1] and out.finish_reason == "stop"
    # EOS: the same token treated as EOS unless ignore_eos
    engine.eos_token_ids = {stop_tok}
    out = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=12))[0]
    assert out.token_ids == base.token_ids[: first + 1] and out.finish_reason == "stop"
    assert engine.generate([[5, 6, 7]], _greedy(12))[0].token_ids == base.token_ids
    # stop string: text is cut before it
    text = base.text
    needle = text[len(text) // 2 : len(text) // 2 + 3]
    if needle.strip():
        out = engine.generate([[5, 6, 7]], _greedy(12, stop=(needle,)))[0]
        assert out.finish_reason == "stop" and out.text == text[: text.index(needle)]
    assert base.finish_reason == "length" and len(base.token_ids) == 12


def test_sampling_reproducible_and_filters():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    p = SamplingParams(temperature=1.0, seed=7)
    a = sample(logits, [p] * 4, [make_generator(7, torch.device("cpu")) for _ in range(4)])
    b = sample(logits, [p] * 4, [make_generator(7, torch.device("cpu")) for _ in range(4)])
    assert a == b
    greedy = logits.argmax(-1).tolist()
    gens = [make_generator(1, torch.device("cpu")) for _ in range(4)]
    assert sample(logits, [SamplingParams(temperature=2.0, top_k=1)] * 4, gens) == greedy
    assert sample(logits, [SamplingParams(temperature=2.0, top_p=1e-6)] * 4, gens) == greedy
    # top-k=3 only ever returns one of the 3 best tokens
    top3 = logits.topk(3).indices
    for _ in range(20):
        s = sample(logits, [SamplingParams(temperature=5.0, top_k=3)] * 4, gens)
        assert all(s[i] in top3[i].tolist() for i in range(4))


def test_greedy_tokens_are_torch_argmax_with_ties_nan_and_strides():
    """The CPU fast path (numpy's argmax) picks what ``torch.argmax`` picks: the first maximum,
    NaN as the maximum, all -inf -> 0, on contiguous and strided rows alike."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(0, 4, (64, 301), generator=g).float()  # many ties
    logits[1, 7] = logits[2, 0] = float("nan")
    logits[3] = float("-inf")
    logits[4, 5:9] = float("inf")
    for x in (logits, logits[::2], logits[:, 1:], logits.t().contiguous().t()):
        got = greedy_tokens(x)
        assert got.dtype == torch.int64 and torch.equal(got, x.argmax(dim=-1))
    with torch.inference_mode():
        assert torch.equal(greedy_tokens(logits.clone()), logits.argmax(dim=-1))


def test_batched_seeded_sample_equals_the_request_sampled_alone():
    """The vectorised sampler: each row's token depends only on its logits, params and generator."""
    torch.manual_seed(1)
    logits = torch.randn(5, 300)
    params = [
        SamplingParams(temperature=0.7, seed=3),
        SamplingParams(),
        SamplingParams(temperature=1.3, top_k=5, seed=4),
        SamplingParams(temperature=1.0, top_p=0.6, seed=5),
        SamplingParams(temperature=2.0, top_k=40, top_p=0.9, seed=6),
    ]
    cpu = torch.device("cpu")
    gens = [make_generator(p.seed, cpu) for p in params]
    alone_gens = [make_generator(p.seed, cpu) for p in params]
    for _ in range(10):  # several steps: each generator advances by one draw per sampled step
        batched = sample(logits, params, gens)
        alone = [sample(logits[i : i + 1], [p], [g])[0] for i, (p, g) in enumerate(zip(params, alone_gens))]
        assert batched == alone
    assert batched[1] == int(logits[1].argmax())


def test_sampler_draws_from_the_filtered_distribution():
    """Inverse-CDF sampling matches softmax(logits / T) restricted by top-k / top-p (frequencies)."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    gens = [make_generator(i, torch.device("cpu")) for i in range(4000)]
    freq = (
        torch.bincount(torch.tensor(sample(logits, [SamplingParams(temperature=1.0)] * 4000, gens)), minlength=4) / 4000
    )
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)
    # top_p = 0.7: 0.5 alone is short of 0.7, 0.5 + 0.3 reaches it, so tokens {0, 1} renormalised.
    freq = (
        torch.bincount(
            torch.tensor(sample(logits, [SamplingParams(temperature=1.0, top_p=0.7)] * 4000, gens)), minlength=4
        )
        / 4000
    )
    torch.testing.assert_close(freq, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.03, rtol=0)
    freq = (
        torch.bincount(
            torch.tensor(sample(logits, [SamplingParams(temperature=1.0, top_k=3)] * 4000, gens)), minlength=4
        )
        / 4000
    )
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=0.03, rtol=0)


def test_seeded_request_same_output_regardless_of_batch(engine):
    p = SamplingParams(max_new_tokens=10, temperature=1.0, seed=123, ignore_eos=True)
    alone = engine.generate([[5, 6, 7]], p)[0].token_ids
    together = engine.generate(
        [[9, 9], [5, 6, 7], [11, 12, 13, 14]], [_greedy(), p, SamplingParams(temperature=0.8, seed=1)]
    )[1].token_ids
    assert alone == together


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_out_of_range_sampling_params(kw, field):
    with pytest.raises(ValidationError, match=field):
        SamplingParams(**kw)


def test_request_validation_names_the_field(engine):
    with pytest.raises(ValueError, match="prompt: empty"):
        engine.add_request([], _greedy())
    with pytest.raises(ValueError, match="prompt_token_ids"):
        engine.add_request([5, 10**6], _greedy())
    with pytest.raises(ValueError, match="prompt: .*context"):
        engine.add_request([5] * engine.context_limit, _greedy())
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.add_request([5], _greedy(engine.context_limit + 5))


def test_plan_constructors_and_errors():
    assert PrunePlan.default(32).skip_layers == tuple(range(22, 32))
    assert PrunePlan.default(30).skip_layers == tuple(range(20, 30))
    assert PrunePlan.from_ratio(36, 1 / 3).skip_layers == tuple(range(24, 36))
    assert PrunePlan.first_third(9).skip_layers == (0, 1, 2)
    assert PrunePlan.every_third(9).skip_layers == (2, 5, 8)
    assert PrunePlan(num_layers=8, skip_layers=(5, 1, 2, 6)).skipped_runs == ((1, 2), (5, 6))
    with pytest.raises(PlanError, match="out of range"):
        PrunePlan(num_layers=4, skip_layers=(4,))
    with pytest.raises(PlanError, match="all 3 layers"):
        PrunePlan(num_layers=3, skip_layers=(0, 1, 2))
    with pytest.raises(PlanError, match="ratio"):
        PrunePlan.from_ratio(10, 1.0)
    with pytest.raises(ValueError, match="at most one"):
        PruneConfig(ratio=0.3, no_prune=True)


def test_plan_file_round_trip_and_mismatch(tmp_path):
    plan = PrunePlan(num_layers=6, skip_layers=(4, 5), model="tiny")
    plan.save(tmp_path / "plan.json")
    assert PrunePlan.load(tmp_path / "plan.json", 6) == plan
    with pytest.raises(PlanError, match="6-layer model, this model has 30"):
        PrunePlan.load(tmp_path / "plan.json", 30)


def test_incremental_detokenizer_matches_full_decode(tiny_ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt("llama"))
    ids = tok.encode("Héllo, wörld! Prefill-only pruning ✓ 1 2 3")
    d = IncrementalDetokenizer(tok)
    pieces = "".join(d.add(i) for i in ids)
    assert pieces == tok.decode(ids, skip_special_tokens=True) == d.text


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pop_disagg.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_generate_json_matches_engine(tiny_ckpt):
    path = tiny_ckpt("qwen3")
    r = _cli("generate", "--model", path, "--prompt-ids", "5,6,7,8", "--max-new-tokens", "6", "--ignore-eos", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    eng = LLMEngine(EngineConfig(model=path), model=load_model(path), model_path=path)
    expected = eng.generate([[5, 6, 7, 8]], _greedy(6))[0]
    assert got == {"token_ids": expected.token_ids, "text": expected.text}


def test_cli_errors_are_one_clear_line(tiny_ckpt):
    path = tiny_ckpt("llama")
    r = _cli("generate", "--model", path, "--prompt", "hi", "--skip-layers", "99")
    assert r.returncode == 2 and "out of range" in r.stderr and "Traceback" not in r.stderr
    r = _cli("generate", "--model", path, "--prompt", "hi", "--top-p", "0")
    assert r.returncode == 2 and "top_p" in r.stderr and "Traceback" not in r.stderr
