"""KV memory as vLLM runs it: blocks on demand, recompute preemption, the prefix cache.

The bars: a warm engine (prefix caching on, blocks reused) emits the greedy tokens of a cold one
(caching off) under the same plan, POP and full, chunked prefill on and off; a cache too small for
every running request still finishes each with the tokens of an unpressured run, streamed without a
repeated token, preempting on the way and leaking nothing; the allocator never hands out a block a
request holds; a request that could never fit is still refused up front.
"""

from __future__ import annotations

import argparse
import functools
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pop_disagg.config import EngineConfig, PruneConfig
from pop_disagg.engine.engine import LLMEngine
from pop_disagg.engine.kv_cache import BlockManager, block_hash
from pop_disagg.engine.request import Request
from pop_disagg.engine.sampling import SamplingParams
from pop_disagg.engine.scheduler import Scheduler
from pop_disagg.models.loader import load_model

BLOCK = 4
PLANS = {
    "full": dict(no_prune=True),
    "pop": dict(),
    "no_boundary": dict(boundary_handling=False),
    "no_independent_kv": dict(independent_kv=False),
}


@functools.cache
def _model(path: str):
    return load_model(path)


def _engine(path, plan="pop", num_blocks=None, caching=True, chunked=False, budget=16, max_num_seqs=4):
    """An engine over the tiny checkpoint; ``num_blocks``: exactly that many KV blocks (else plenty)."""
    model = _model(path)
    mb = 8.0
    if num_blocks is not None:
        mb = num_blocks * model.arch.kv_bytes_per_token(4) * BLOCK / 2**20
    cfg = EngineConfig(
        model=path,
        prune=PruneConfig(**PLANS[plan]),
        kv_cache_memory_mb=mb,
        block_size=BLOCK,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        enable_chunked_prefill=chunked,
        enable_prefix_caching=caching,
    )
    eng = LLMEngine(cfg, model=model, model_path=path)
    assert num_blocks is None or eng.blocks.num_blocks == num_blocks
    return eng


def _greedy(n):
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def _ids(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (n,), generator=g).tolist()


def _assert_no_leak(eng):
    """Every block is free or evictable, nobody holds one, and the queues are empty."""
    bm = eng.blocks
    assert not eng.has_unfinished() and not eng.scheduler.reserved
    assert bm.num_free_blocks == bm.num_blocks and all(c == 0 for c in bm.ref_counts)


def _run(eng, arrivals):
    """``arrivals``: (step, prompt, max_new_tokens) in any order. Adds each request at its step and
    runs to the end; returns {request id: tokens} from the streamed deltas, checked against the
    final outputs (no token repeated or lost)."""
    streamed, final = {}, {}
    pending = sorted(enumerate(arrivals), key=lambda x: x[1][0])
    step = 0
    while pending or eng.has_unfinished():
        while pending and pending[0][1][0] <= step:
            i, (_, prompt, n) = pending.pop(0)
            eng.add_request(prompt, _greedy(n), request_id=f"r{i}")
        for out in eng.step():
            streamed.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                final[out.request_id] = out.token_ids
        step += 1
        assert step < 5000, "no progress"
    assert streamed == final
    return final


# ---- the allocator alone ---------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "publish", "hit"]), st.integers(0, 7)), max_size=60))
def test_allocation_never_hands_out_a_referenced_block(ops):
    """Random allocate / release / publish / prefix-hit sequences on a small pool: a block handed
    out was held by nobody, reference counts equal the holders, and every block is in exactly one
    of free, evictable, referenced."""
    bm = BlockManager(num_blocks=6, block_size=BLOCK)
    held: list[list[int]] = []  # each entry: one holder's blocks
    published: list[bytes] = []
    for op, arg in ops:
        if op == "alloc":
            n = arg % 4
            if n > bm.num_free_blocks:
                continue
            before = list(bm.ref_counts)
            got = bm.allocate_blocks(n)
            assert all(before[b] == 0 for b in got) and len(set(got)) == n
            held.append(got)
        elif op == "free" and held:
            bm.free(held.pop(arg % len(held)))
        elif op == "publish" and held and held[arg % len(held)]:
            blocks = held[arg % len(held)]
            h = block_hash(b"", [arg, len(published)], b"key")
            bm.cache(blocks[arg % len(blocks)], h)
            published.append(h)
        elif op == "hit" and published:
            block = bm.cached_block(published[arg % len(published)])
            if block is not None:
                bm.take([block])
                held.append([block])
        holders = [0] * bm.num_blocks
        for blocks in held:
            for b in blocks:
                holders[b] += 1
        assert bm.ref_counts == holders
        referenced = sum(1 for c in holders if c)
        assert bm.num_free_blocks + referenced == bm.num_blocks
        for h in published:  # a cached name points at a block that still holds it
            b = bm.cached_block(h)
            assert b is None or bm._hash_of[b] == h
    for blocks in held:
        bm.free(blocks)
    assert bm.num_free_blocks == bm.num_blocks


def test_eviction_takes_free_blocks_first_then_the_least_recently_released():
    bm = BlockManager(num_blocks=4, block_size=BLOCK)
    a, b = bm.allocate_blocks(1), bm.allocate_blocks(1)
    bm.cache(a[0], b"a")
    bm.cache(b[0], b"b")
    bm.free(a)
    bm.free(b)  # both evictable, a released first
    assert bm.num_free_blocks == 4 and bm.num_evictable_blocks == 2
    assert bm.allocate_blocks(2) == [2, 3]  # the two never-used blocks first: nothing evicted
    bm.take([bm.cached_block(b"b")])  # a hit: held again, not evictable
    assert bm.allocate_blocks(1) == a and bm.cached_block(b"a") is None  # a evicted, b kept
    with pytest.raises(RuntimeError, match="need 1 blocks, 0 free"):
        bm.allocate_blocks(1)
    assert bm.cached_block(b"b") == b[0]


# ---- the scheduler alone ---------------------------------------------------------------------------
def _sched(num_blocks, chunked=False, prefix_key=None, max_num_seqs=4):
    blocks = BlockManager(num_blocks, BLOCK)
    return Scheduler(blocks, max_num_seqs, 64, 512, enable_chunked_prefill=chunked, prefix_key=prefix_key), blocks


def _advance(out):
    """What the runner does to the counters."""
    for r, n in zip(out.prefill, out.num_prefill_tokens):
        r.num_computed_tokens += n
    for r, n in zip(out.recompute, out.num_recompute_tokens):
        r.num_computed_tokens += n
    for r in out.decode:
        r.num_computed_tokens += 1
        r.output_token_ids.append(7)


@pytest.mark.parametrize("chunked", [False, True])
def test_blocks_come_on_demand_and_the_newest_request_is_preempted(chunked):
    s, blocks = _sched(6, chunked)
    old, new = Request("old", list(range(3, 12)), _greedy(12)), Request("new", list(range(3, 7)), _greedy(12))
    s.add(old)
    out = s.schedule()
    assert len(old.block_table) == 2 + chunked  # its 8-token prefix (chunked: and the boundary token's block)
    _advance(out)
    s.add(new)
    while new.status.value == "waiting" or not s.is_prefilled(new):
        _advance(s.schedule())
    grown = False
    while not s.stats.num_preemptions:
        before = len(old.block_table)
        out = s.schedule()
        grown |= len(old.block_table) > before
        _advance(out)
    assert grown  # a block when its next token crossed a boundary
    # The cache ran out: the newest request went back to the front of the queue, blocks released,
    # its generated tokens kept; the oldest goes on.
    assert list(s.waiting) == [new] and new.block_table == [] and new.num_computed_tokens == 0
    assert new.output_token_ids and new.num_preemptions == 1 and s.running == [old]
    s.finish(old)  # (aborted) its blocks free up
    assert blocks.num_free_blocks == blocks.num_blocks
    out = s.schedule()  # re-admitted first: prompt prefix (pruned), then its full-model positions
    if chunked:
        assert out.prefill == [new] and out.num_prefill_tokens == [3]
    else:
        assert out.prefill == [new] and out.recompute == [new]
        assert out.num_prefill_tokens == [3] and out.num_recompute_tokens == [new.num_tokens - 1 - 3]


def test_a_request_that_could_never_fit_is_refused_up_front(tiny_ckpt):
    eng = _engine(tiny_ckpt("llama"), num_blocks=8)
    with pytest.raises(ValueError, match="needs 9 KV blocks but the cache has only 8"):
        eng.add_request([5] * 10, _greedy(8 * BLOCK - 10 + 1))
    assert not eng.has_unfinished()
    # Exactly the whole cache: accepted, and it finishes even beside another request.
    outs = eng.generate([[5] * 10, [6] * 3], [_greedy(8 * BLOCK - 10), _greedy(20)])
    assert [len(o.token_ids) for o in outs] == [8 * BLOCK - 10, 20]
    _assert_no_leak(eng)


# ---- prefix cache: warm == cold --------------------------------------------------------------------
def _shared_prefix_rounds(seed):
    """Three rounds of prompts over one 21-token system prefix: the second and third rounds find the
    first's blocks (an exact repeat, a longer continuation, a different suffix)."""
    sys = _ids(seed, 21)
    a, b, c = _ids(seed + 1, 6), _ids(seed + 2, 11), _ids(seed + 3, 3)
    return [[sys + a, sys + b], [sys + a, sys + a + c, sys + c], [sys[:9] + c]]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("plan", ["full", "pop"])
@pytest.mark.parametrize("chunked", [False, True])
def test_warm_engine_equals_cold(tiny_ckpt, family, plan, chunked):
    path = tiny_ckpt(family)
    rounds = _shared_prefix_rounds(0)
    cold = _engine(path, plan, caching=False, chunked=chunked, budget=8)
    warm = _engine(path, plan, caching=True, chunked=chunked, budget=8)
    for prompts in rounds:
        expected = [o.token_ids for o in cold.generate(prompts, _greedy(6))]
        outs = warm.generate(prompts, _greedy(6))
        assert [o.token_ids for o in outs] == expected
    assert cold.stats.num_prefix_cache_hits == 0 and cold.stats.num_prefix_cache_queries == 0
    # Round 2 hit round 1's blocks: 20 of the 21 system tokens (5 blocks; the 6th holds position 21).
    assert warm.stats.num_prefix_cache_hits >= 3 * 20
    assert outs[0].num_cached_tokens == 8  # round 3: sys[:9] + c, its first two blocks
    _assert_no_leak(warm)
    assert warm.blocks.num_cached_blocks > 0  # what is cached stays for the next request


@pytest.mark.parametrize("plan", ["full", "pop"])
def test_a_fully_cached_prefix_goes_straight_to_its_boundary_step(tiny_ckpt, plan):
    path = tiny_ckpt("llama")
    eng = _engine(path, plan)
    prompt = _ids(5, 3 * BLOCK + 1)  # prefix of exactly 3 blocks
    first = eng.generate([prompt], _greedy(5))[0]
    assert first.num_cached_tokens == 0
    eng.add_request(prompt, _greedy(5), request_id="again")
    batch = eng.scheduler.schedule()
    assert not batch.prefill and [r.request_id for r in batch.decode] == ["again"]
    req = batch.decode[0]
    assert req.num_computed_tokens == 3 * BLOCK and req.next_input_token == prompt[-1]  # x_N, full model
    outs = eng._update(batch, *eng.runner.run(batch))
    while eng.has_unfinished():
        outs += eng.step()
    assert outs[-1].token_ids == first.token_ids and outs[-1].num_cached_tokens == 3 * BLOCK


@pytest.mark.parametrize("plan", ["full", "pop"])
def test_a_warm_rest_and_its_boundary_token_share_one_step(tiny_ckpt, plan):
    """Whole-prompt steps: a request whose prefix starts in cached blocks runs its rest as a chunk
    and its boundary token as a decode row of the same forward, so its first token comes from its
    first step, with a cold run's tokens."""
    path = tiny_ckpt("llama")
    eng = _engine(path, plan)
    system = _ids(6, 2 * BLOCK)
    cold = eng.generate([system + _ids(7, 5)], _greedy(5))[0]
    prompt = system + _ids(8, 5)
    want = _engine(path, plan, caching=False).generate([prompt], _greedy(5))[0].token_ids
    eng.add_request(prompt, _greedy(5), request_id="warm")
    batch = eng.scheduler.schedule()
    assert [r.request_id for r in batch.prefill] == ["warm"] and batch.decode == batch.prefill
    outs = eng._update(batch, *eng.runner.run(batch))
    assert [o.request_id for o in outs] == ["warm"] and len(outs[0].token_ids) == 1
    while eng.has_unfinished():
        outs += eng.step()
    assert outs[-1].token_ids == want and outs[-1].num_cached_tokens == 2 * BLOCK
    assert cold.num_cached_tokens == 0
    _assert_no_leak(eng)


def test_no_boundary_ablation_recomputes_the_last_prompt_token(tiny_ckpt):
    """Without boundary handling the pruned pass samples the first token: a repeated prompt keeps
    at least its last position to compute, and its tokens equal the cold run's."""
    path = tiny_ckpt("llama")
    prompt = _ids(6, 3 * BLOCK)  # the whole pruned pass is 3 blocks; the hit stops at 2
    eng = _engine(path, "no_boundary")
    first = eng.generate([prompt], _greedy(5))[0]
    again = eng.generate([prompt], _greedy(5))[0]
    assert again.num_cached_tokens == 2 * BLOCK and again.token_ids == first.token_ids
    assert again.token_ids == _engine(path, "no_boundary", caching=False).generate([prompt], _greedy(5))[0].token_ids


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_multi_turn_reuse_full_model_and_pop(tiny_ckpt, family):
    """A follow-up turn (prompt = first turn's prompt + its answer + more). Full model: prefill and
    decode write the same K/V, so the answer's blocks are reused too; POP: only the blocks the first
    turn's pruned prefill wrote (the answer's were written by the full model, a cold POP prefill of
    the follow-up would prune them). Either way the tokens equal a cold run's."""
    path = tiny_ckpt(family)
    prompt, more = _ids(7, 14), _ids(8, 5)
    for plan in ("full", "pop"):
        warm, cold = _engine(path, plan), _engine(path, plan, caching=False)
        answer = warm.generate([prompt], _greedy(10))[0].token_ids
        follow_up = prompt + answer + more
        got = warm.generate([follow_up], _greedy(6))[0]
        assert got.token_ids == cold.generate([follow_up], _greedy(6))[0].token_ids
        if plan == "full":  # prompt + answer = 24 tokens, of which 23 computed: 5 full blocks
            assert got.num_cached_tokens == 5 * BLOCK
        else:  # the prompt prefix's 13 tokens: 3 full blocks
            assert got.num_cached_tokens == 3 * BLOCK


def test_pop_and_full_blocks_never_mix(tiny_ckpt):
    """Equal tokens prefilled under another plan are no hit: the key names the plan."""
    from pop_disagg.engine.kv_cache import plan_cache_key

    path = tiny_ckpt("llama")
    eng = _engine(path, "pop")
    arch = eng.arch
    full = PruneConfig(no_prune=True).resolve(arch.num_layers)
    assert plan_cache_key(path, full) != plan_cache_key(path, eng.plan)
    assert plan_cache_key(path, eng.plan) != plan_cache_key(path, eng.plan.model_copy(update={"independent_kv": False}))
    # One allocator, two schedulers keyed by different plans: the full one finds none of POP's blocks.
    prompt = _ids(9, 17)
    eng.generate([prompt], _greedy(3))
    s = Scheduler(eng.blocks, 4, 64, 512, prefix_key=plan_cache_key(path, full), is_prefill_full_model=True)
    assert s._cached_prefix(Request("x", prompt, _greedy(3))) == []
    assert eng.scheduler._cached_prefix(Request("y", prompt, _greedy(3)))  # POP's own plan does


# ---- preemption ------------------------------------------------------------------------------------
def _pressure_workload(seed):
    rng = random.Random(seed)
    return [(rng.randrange(4), _ids(seed * 10 + i, rng.randrange(1, 15)), rng.randrange(6, 17)) for i in range(5)]


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("caching", [True, False])
def test_preempted_requests_finish_with_unpressured_tokens(tiny_ckpt, plan, chunked, caching):
    """Five requests in a cache of 10 blocks (40 tokens; together they want ~100): the newest are
    preempted and recomputed (prompt prefix under the plan, boundary and generated tokens by the full
    model), and every request's streamed tokens equal the unpressured run's."""
    path = tiny_ckpt("llama")
    arrivals = _pressure_workload(1)
    expected = _run(_engine(path, plan, caching=False, chunked=chunked, budget=8), arrivals)
    eng = _engine(path, plan, num_blocks=10, caching=caching, chunked=chunked, budget=8)
    assert _run(eng, arrivals) == expected
    assert eng.stats.num_preemptions > 0
    _assert_no_leak(eng)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    arrivals=st.lists(st.tuples(st.integers(0, 6), st.integers(1, 14), st.integers(1, 16)), min_size=2, max_size=5),
    plan=st.sampled_from(["full", "pop"]),
    chunked=st.booleans(),
    family=st.sampled_from(["llama", "gemma3"]),
)
def test_preemption_under_any_arrivals(tiny_ckpt, arrivals, plan, chunked, family):
    path = tiny_ckpt(family)
    work = [(step, _ids(100 + i, n), m) for i, (step, n, m) in enumerate(arrivals)]
    expected = _run(_engine(path, plan, caching=False, chunked=chunked, budget=8), work)
    eng = _engine(path, plan, num_blocks=8, chunked=chunked, budget=8)
    assert _run(eng, work) == expected
    _assert_no_leak(eng)


def test_disaggregated_request_preempted_on_the_decode_worker_is_reprefilled_there(tiny_ckpt):
    """Transferred requests in a small decode cache: the worker preempts, re-prefills locally under
    its plan (the prefill worker's here) and streams the engine's tokens, each once."""
    import threading
    import time

    from pop_disagg.disagg.decode_worker import DecodeWorker, Failed, Tokens
    from pop_disagg.disagg.kv_transfer import FakeTransport, KVSender
    from pop_disagg.disagg.prefill_worker import PrefillTask, PrefillWorker

    path = tiny_ckpt("qwen3")
    prompts = [_ids(200 + i, n) for i, n in enumerate((9, 13, 6, 11))]
    expected = [o.token_ids for o in _engine(path, "pop").generate(prompts, _greedy(14))]
    eng = _engine(path, "pop", num_blocks=12)
    decode = DecodeWorker(eng, transfer_timeout_s=10)
    a, b = FakeTransport.pair()
    arch = eng.arch
    sender = KVSender(a, arch.num_layers, (arch.num_kv_heads, arch.head_dim), torch.float32, 10)
    decode.attach_link(0, b)
    prefill = PrefillWorker(load_model(path, prefill_only_plan=eng.plan), eng.plan, {0: sender})
    stop = threading.Event()
    threads = [threading.Thread(target=w.run, args=(stop,), daemon=True) for w in (prefill, decode)]
    for t in threads:
        t.start()
    events = {f"r{i}": [] for i in range(len(prompts))}
    try:
        for i, p in enumerate(prompts):
            rid = f"r{i}"
            res = decode.reserve(rid, p, _greedy(14), 0, events[rid].append)
            assert res is not None
            tid = res.transfer_id  # the prompt's blocks only: all four fit at once
            prefill.submit(PrefillTask(rid, tid, 0, p[:-1], lambda o: None))
        deadline = time.monotonic() + 60
        while not all(any(isinstance(e, Tokens) and e.is_finished for e in evs) for evs in events.values()):
            assert time.monotonic() < deadline and not any(isinstance(e, Failed) for v in events.values() for e in v)
            time.sleep(0.01)
    finally:
        sender.close()
        stop.set()
        for t in threads:
            t.join(2)
    got = [[t for e in events[f"r{i}"] if isinstance(e, Tokens) for t in e.token_ids] for i in range(len(prompts))]
    assert got == expected
    assert decode.counters["num_preemptions"] > 0
    _assert_no_leak(eng)


# ---- served ---------------------------------------------------------------------------------------
def test_colocated_server_reports_cached_tokens_and_engine_counters(ray_instance, tiny_ckpt):
    """Through the router: ``usage.prompt_tokens_details.cached_tokens`` of a repeated prompt (gRPC's
    ``Usage.cached_tokens`` too), ``n`` samples sharing the prompt's blocks, and the
    engine counters on ``/metrics`` (a tight cache, so that requests in flight together preempt)."""
    import json
    import time
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    from pop_disagg._proto import generation_pb2 as pb
    from pop_disagg._proto import generation_pb2_grpc as pb_grpc
    from pop_disagg.config import ServeConfig
    from pop_disagg.server.app import BackgroundServer

    path = tiny_ckpt("qwen2")
    model = _model(path)
    mb = 12 * model.arch.kv_bytes_per_token(4) * BLOCK / 2**20  # 12 blocks
    engine = EngineConfig(model=path, kv_cache_memory_mb=mb, block_size=BLOCK, max_model_len=256)
    srv = BackgroundServer(
        ServeConfig(engine=engine, topology="colocated"), http_port=0, metrics_port=0, kv_poll_interval_s=0.1
    )

    def complete(prompt, n=8):
        body = json.dumps({"model": path, "prompt": prompt, "max_tokens": n, "ignore_eos": True}).encode()
        req = urllib.request.Request(
            srv.http_url + "/v1/completions", body, headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())["usage"]

    def sample(prompt, n=1, seed=11):
        body = {"model": path, "prompt": prompt, "max_tokens": 6, "temperature": 1.0, "seed": seed, "n": n}
        req = urllib.request.Request(
            srv.http_url + "/v1/completions", json.dumps(body).encode(), headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())

    def scrape():
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.server.metrics_port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}

    try:
        prompt = _ids(300, 18)
        assert complete(prompt)["prompt_tokens_details"]["cached_tokens"] == 0
        assert complete(prompt)["prompt_tokens_details"]["cached_tokens"] == 16  # 17-token prefix: 4 blocks
        # gRPC: the same count in Usage, unary and on a stream's last message; a new prompt has none.
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            ask = lambda ids: pb.GenerateRequest(prompt_token_ids=ids, max_new_tokens=4, ignore_eos=True)  # noqa: E731
            assert stub.Generate(ask(prompt), timeout=60).usage.cached_tokens == 16
            last = list(stub.GenerateStream(ask(prompt), timeout=60))[-1]
            assert last.usage.cached_tokens == 16 and last.usage.prompt_tokens == 18
            assert stub.Generate(ask(_ids(301, 18)), timeout=60).usage.cached_tokens == 0
        # n = 3 samples of a new prompt share its blocks: samples 1 and 2 find its 4 prefix blocks
        # cached (computing 12 blocks' worth of prompt less than three separate prompts at once
        # would), and each sample's text is that of a request of its own with seed + i.
        time.sleep(0.5)  # the counters are polled every 0.1 s: let the requests above land first
        hits = scrape()["pop_disagg:prefix_cache_hits_total"]
        shared = _ids(302, 18)
        texts = [c["text"] for c in sample(shared, n=3)["choices"]]
        time.sleep(0.5)
        assert scrape()["pop_disagg:prefix_cache_hits_total"] - hits == 2 * 16
        assert texts == [sample(shared, seed=11 + i)["choices"][0]["text"] for i in range(3)]
        # Slow steps keep the four in flight together; each wants 10 of the 12 blocks.
        ray.get(srv.deployment.decode[0].inject_fault.remote("slow_decode", 0.01))
        with ThreadPoolExecutor(4) as pool:
            usages = list(pool.map(lambda i: complete(_ids(310 + i, 9), 30), range(4)))
        assert all(u["completion_tokens"] == 30 for u in usages)
        deadline = time.monotonic() + 10
        while (m := scrape())["pop_disagg:num_preemptions_total"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert m["pop_disagg:num_preemptions_total"] > 0
        assert m["pop_disagg:prefix_cache_hits_total"] >= 16
        assert m["pop_disagg:prefix_cache_queries_total"] >= 2 * 18 + 4 * 9
    finally:
        srv.stop()


# ---- flags -----------------------------------------------------------------------------------------
def test_prefix_caching_flag_reaches_the_engine_config():
    from pop_disagg.commands.common import add_batching_args, add_model_args, add_prune_args, engine_config
    from pop_disagg.commands.serve import add_serve_args, serve_config

    p = argparse.ArgumentParser()
    add_model_args(p)
    add_batching_args(p)
    add_prune_args(p)
    assert engine_config(p.parse_args([])).enable_prefix_caching  # vLLM's default
    assert not engine_config(p.parse_args(["--no-enable-prefix-caching"])).enable_prefix_caching
    p = argparse.ArgumentParser()
    add_serve_args(p)
    off = serve_config(p.parse_args(["--no-enable-prefix-caching", "--threads", "1"]))
    assert not off.engine.enable_prefix_caching and not off.worker_engine.enable_prefix_caching
    assert serve_config(p.parse_args(["--threads", "1"])).engine.enable_prefix_caching
