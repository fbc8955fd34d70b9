"""Chunked prefill with mixed batches: same tokens as whole-prompt prefill, POP applied per chunk.

A step carries every decoding request's next token plus prompt chunks up to the token budget
(``max_num_batched_tokens``). The bar: the chunked engine equals the non-chunked one token for
token (greedy), for the full model, POP plans and both ablations; the K/V a chunked POP prefill
writes equal the one-shot pruned prefill's; blocks all come back, also after an abort mid-prompt.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from pop_disagg.config import EngineConfig, PruneConfig
from pop_disagg.engine.engine import LLMEngine
from pop_disagg.engine.kv_cache import BlockManager
from pop_disagg.engine.request import Request
from pop_disagg.engine.sampling import SamplingParams
from pop_disagg.engine.scheduler import Scheduler
from pop_disagg.models.loader import load_model

PROMPT_LENS = (1, 2, 7, 21, 40, 9)  # 21 and 40 take several 8-token chunks; 40 > gemma3's window of 8


def _prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _engine(path, model, chunked, budget=8, max_num_seqs=4, **prune):
    cfg = EngineConfig(
        model=path,
        prune=PruneConfig(**prune),
        kv_cache_memory_mb=8,
        block_size=4,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        enable_chunked_prefill=chunked,
    )
    return LLMEngine(cfg, model=model, model_path=path)


def _greedy(n=8):
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def _record_steps(engine):
    """Wrap the scheduler so every step's (decode count, [(request, chunk tokens)]) is kept."""
    steps, schedule = [], engine.scheduler.schedule

    def recording():
        out = schedule()
        steps.append((len(out.decode), [(r, n) for r, n in zip(out.prefill, out.num_prefill_tokens)]))
        return out

    engine.scheduler.schedule = recording
    return steps


PLANS = {
    "full": dict(no_prune=True),
    "pop": dict(),
    "first_third": dict(skip_layers=(0, 1)),
    "no_boundary": dict(boundary_handling=False),
    "no_independent_kv": dict(independent_kv=False),
}


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3"])
@pytest.mark.parametrize("plan", list(PLANS))
def test_chunked_engine_equals_whole_prompt_prefill(tiny_ckpt, family, plan):
    path = tiny_ckpt(family)
    model = load_model(path)
    prompts = _prompts()
    expected = [o.token_ids for o in _engine(path, model, chunked=False, **PLANS[plan]).generate(prompts, _greedy())]
    for budget in (8, 16):
        eng = _engine(path, model, chunked=True, budget=budget, **PLANS[plan])
        steps = _record_steps(eng)
        got = [o.token_ids for o in eng.generate(prompts, _greedy())]
        assert got == expected, f"budget {budget}"
        assert eng.blocks.num_free_blocks == eng.blocks.num_blocks
        # The schedule really chunked and mixed: every step within budget, long prompts split, and
        # steps that carried decode tokens beside a chunk.
        assert all(d + sum(n for _, n in chunks) <= budget for d, chunks in steps)
        assert sum(1 for d, chunks in steps if d and chunks) >= 2
        chunks_of = {}
        for _, chunks in steps:
            for r, n in chunks:
                chunks_of.setdefault(r.num_prompt_tokens, []).append(n)
        assert len(chunks_of[40]) >= 40 // budget
    if plan == "pop":  # the plan matters on these prompts, so equality above is not trivially the full model's
        full = [o.token_ids for o in _engine(path, model, chunked=False, no_prune=True).generate(prompts, _greedy())]
        assert full != expected


def test_a_step_carries_decode_tokens_and_a_prompt_chunk(tiny_ckpt):
    path = tiny_ckpt("llama")
    eng = _engine(path, load_model(path), chunked=True, budget=8)
    short, long = _prompts()[2], _prompts()[4]  # 7 and 40 tokens
    eng.add_request(short, _greedy(12), request_id="short")
    outs = eng.step()  # its 6-token prefix and, as a decode row of the same forward, its boundary token
    assert [o.request_id for o in outs] == ["short"] and eng._requests["short"].num_computed_tokens == 7
    eng.add_request(long, _greedy(4), request_id="long")
    batch = eng.scheduler.schedule()
    assert [r.request_id for r in batch.decode] == ["short"]
    assert [r.request_id for r in batch.prefill] == ["long"] and batch.num_prefill_tokens == [
        7
    ]  # the budget left after one decode token
    reqs, tokens = eng.runner.mixed(batch.decode, batch.prefill, batch.num_prefill_tokens)
    assert [r.request_id for r in reqs] == ["short"] and len(tokens) == 1
    assert batch.prefill[0].num_computed_tokens == 7 and batch.decode[0].num_computed_tokens == 8


@pytest.mark.parametrize("plan", ["full", "pop"])
def test_first_token_comes_in_the_step_that_completes_the_prefix(tiny_ckpt, plan):
    """The boundary token x_N rides in the forward of the prompt's last chunk (a decode row: full
    model), so the first token arrives with that step, and the tokens equal the unchunked engine's."""
    path = tiny_ckpt("qwen3")
    model = load_model(path)
    prune = {"no_prune": True} if plan == "full" else {}
    prompt = _prompts()[4]  # 40 tokens: prefix of 39 in chunks of at most 16
    eng = _engine(path, model, chunked=True, budget=16, **prune)
    eng.add_request(prompt, _greedy(3), request_id="r")
    first_output_step, step = None, 0
    while eng.has_unfinished():
        step += 1
        outs = eng.step()
        if outs and first_output_step is None:
            first_output_step = step
    assert first_output_step == 3  # 16 + 16 + 7 prefix tokens; x_N rides in step 3 (1 token of budget left over)
    expected = _engine(path, model, chunked=False, **prune).generate([prompt], _greedy(3))[0].token_ids
    got = _engine(path, model, chunked=True, budget=16, **prune).generate([prompt], _greedy(3))[0].token_ids
    assert got == expected


def test_chunked_pop_kv_equals_one_shot_pruned_prefill(tiny_ckpt):
    """Every layer's K/V of the prompt prefix, skipped layers included, as the one-shot prefill wrote them."""
    path = tiny_ckpt("gemma3")
    model = load_model(path)
    prompt, other = _prompts(3)[4], _prompts(3)[2]  # 40 tokens: chunks 7, 7, ... beside a decoding request
    one_shot = _engine(path, model, chunked=False)
    one_shot.add_request(prompt, _greedy(1), request_id="p")
    one_shot.step()
    req_ref = one_shot._requests["p"]
    assert req_ref.num_computed_tokens == len(prompt) - 1

    eng = _engine(path, model, chunked=True, budget=8)
    eng.add_request(other, _greedy(30), request_id="o")
    eng.step()
    eng.step()  # "o" decodes from now on
    eng.add_request(prompt, _greedy(2), request_id="p")
    req = eng._requests["p"]
    steps = _record_steps(eng)
    while req.num_computed_tokens < len(prompt) - 1:
        eng.step()
    # mixed steps all along; in the last one p's boundary token is a second decode row
    assert len(steps) >= 5 and [d for d, _ in steps] == [1] * (len(steps) - 1) + [2]
    n = len(prompt) - 1
    slots = torch.tensor(eng.blocks.slots(req.block_table, 0, n))
    slots_ref = torch.tensor(one_shot.blocks.slots(req_ref.block_table, 0, n))
    for layer in range(model.arch.num_layers):
        k, v = eng.kv_cache.read(layer, slots)
        k_ref, v_ref = one_shot.kv_cache.read(layer, slots_ref)
        torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5, msg=f"layer {layer} K")
        torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-5, msg=f"layer {layer} V")
    # The skipped layers' K/V differ from a full prefill's (so the comparison above could fail).
    full = _engine(path, model, chunked=False, no_prune=True)
    full.add_request(prompt, _greedy(1), request_id="p")
    full.step()
    slots_full = torch.tensor(full.blocks.slots(full._requests["p"].block_table, 0, n))
    last = model.arch.num_layers - 1
    assert last in eng.plan.skip_layers
    assert not torch.allclose(eng.kv_cache.read(last, slots)[0], full.kv_cache.read(last, slots_full)[0], atol=1e-3)


def test_abort_mid_prompt_and_finish_return_every_block(tiny_ckpt):
    path = tiny_ckpt("llama")
    eng = _engine(path, load_model(path), chunked=True, budget=8)
    total = eng.blocks.num_blocks
    prompts = _prompts()
    eng.add_request(prompts[4], _greedy(), request_id="long")
    eng.add_request(prompts[3], _greedy(), request_id="mid")
    eng.step()
    long = eng._requests["long"]
    assert 0 < long.num_computed_tokens < len(prompts[4]) - 1
    assert eng.blocks.num_free_blocks < total
    assert eng.abort("long")
    eng.add_request(prompts[0], _greedy(), request_id="one")
    while eng.has_unfinished():
        eng.step()
    assert eng.blocks.num_free_blocks == total and not eng.scheduler.running


def test_chunked_schedule_budget_order_and_admission():
    """Plain-Python schedule: decode first, partial prefills before new ones, budget never exceeded."""
    blocks = BlockManager(num_blocks=64, block_size=4)
    s = Scheduler(blocks, max_num_seqs=3, max_num_batched_tokens=10, context_limit=256, enable_chunked_prefill=True)
    reqs = [Request(f"r{i}", list(range(3, 3 + n)), _greedy(4)) for i, n in enumerate((13, 6, 1, 5))]
    for r in reqs:
        s.add(r)

    def run(out):  # what the runner would do to the counters
        for r, n in zip(out.prefill, out.num_prefill_tokens):
            r.num_computed_tokens += n
        for r in out.decode:
            r.num_computed_tokens += 1
            r.output_token_ids.append(0)

    out = s.schedule()  # r0 takes 10 of its 12; the budget is spent before r1 is admitted
    assert [(r.request_id, n) for r, n in zip(out.prefill, out.num_prefill_tokens)] == [("r0", 10)] and not out.decode
    run(out)
    # r0's last 2 and its boundary token, r1's 5 and its boundary token, then the one-token r2
    # decodes at once: 10 tokens; r3 waits (max_num_seqs)
    out = s.schedule()
    assert [(r.request_id, n) for r, n in zip(out.prefill, out.num_prefill_tokens)] == [("r0", 2), ("r1", 5)]
    assert [r.request_id for r in out.decode] == ["r0", "r1", "r2"] and [r.request_id for r in s.waiting] == ["r3"]
    run(out)
    out = s.schedule()  # everything admitted is prefilled: a decode step
    assert [r.request_id for r in out.decode] == ["r0", "r1", "r2"] and not out.prefill
    s.finish(reqs[2])
    out = s.schedule()  # r3 is admitted into the freed seat, beside the two decodes; its boundary token rides along
    assert [r.request_id for r in out.decode] == ["r0", "r1", "r3"]
    assert [(r.request_id, n) for r, n in zip(out.prefill, out.num_prefill_tokens)] == [("r3", 4)]


def test_whole_prompt_schedule_is_unchanged_by_default():
    blocks = BlockManager(num_blocks=64, block_size=4)
    s = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=10, context_limit=256)
    reqs = [Request(f"r{i}", list(range(3, 3 + n)), _greedy(4)) for i, n in enumerate((13, 6))]
    for r in reqs:
        s.add(r)
    out = s.schedule()  # a prompt over the budget still runs whole, alone
    assert out.prefill == [reqs[0]] and out.num_prefill_tokens == [12] and not out.decode


def test_cli_flags_reach_the_engine_config():
    from pop_disagg.commands.common import add_batching_args, add_model_args, add_prune_args, engine_config
    from pop_disagg.commands.serve import add_serve_args, serve_config

    p = argparse.ArgumentParser()
    add_model_args(p)
    add_batching_args(p)
    add_prune_args(p)
    cfg = engine_config(p.parse_args(["--enable-chunked-prefill", "--max-num-batched-tokens", "256"]))
    assert cfg.enable_chunked_prefill and cfg.max_num_batched_tokens == 256
    assert not engine_config(p.parse_args([])).enable_chunked_prefill
    p = argparse.ArgumentParser()
    add_serve_args(p)
    cfg = serve_config(
        p.parse_args(
            ["--topology", "colocated", "--enable-chunked-prefill", "--max-num-batched-tokens", "64", "--threads", "1"]
        )
    )
    assert cfg.engine.enable_chunked_prefill and cfg.engine.max_num_batched_tokens == 64


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_chunked_engine_equals_whole_prompt_prefill_on_gpu(tiny_ckpt, family):
    """Not run in CI (no GPU): on CUDA, chunk steps of one prompt take the mask-free lower-right
    causal path (and decode steps CUDA graphs); greedy tokens == whole-prompt prefill, eager."""
    path = tiny_ckpt(family)
    model = load_model(path, device="cuda")
    prompts = _prompts()

    def run(chunked, budget, eager):
        cfg = EngineConfig(
            model=path,
            device="cuda",
            kv_cache_memory_mb=8,
            block_size=4,
            max_num_seqs=1,
            enforce_eager=eager,
            max_num_batched_tokens=budget,
            enable_chunked_prefill=chunked,
        )
        return [o.token_ids for o in LLMEngine(cfg, model=model, model_path=path).generate(prompts, _greedy())]

    expected = run(False, 64, True)
    assert run(True, 8, True) == expected  # max_num_seqs=1: every chunk step holds one sequence
    assert run(True, 8, False) == expected
