"""Prefix reuse across the prefill/decode split.

The bars: with prefix caching on, a disaggregated pair (fake link) emits the greedy tokens of the
single-process engine's cold run under the same plan, POP and full, for warm requests (a shared
system prompt, a multi-turn follow-up), chunked prefill on and off; only the prefix positions the
decode worker does not hold cross the link (its transfer counter says exactly how many); the
prefill worker encodes a cached prefix once and ships cached K/V from its own pool when the decode
worker lacks them; a short uncached rest is prefilled on the decode worker with nothing sent; the
router's KV-aware choice trades overlap against load; and a served 1P2D deployment does all of it
through gRPC, its ``kv_transfer_bytes_total`` counting only the uncached suffixes.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pop_disagg.config import EngineConfig, PruneConfig
from pop_disagg.disagg.decode_worker import DecodeWorker, Failed, Tokens
from pop_disagg.disagg.kv_transfer import FakeTransport, KVSender
from pop_disagg.disagg.prefill_cache import PrefillCache
from pop_disagg.disagg.prefill_worker import PrefillTask, PrefillWorker
from pop_disagg.engine.engine import LLMEngine
from pop_disagg.engine.kv_cache import PrefixKey, plan_cache_key
from pop_disagg.engine.sampling import SamplingParams
from pop_disagg.models.loader import load_model
from pop_disagg.server.control.router import kv_aware_choice

BLOCK = 4
PLANS = {"full": dict(no_prune=True), "pop": dict()}


def _ids(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (n,), generator=g).tolist()


def _greedy(n):
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def _engine(path, plan, caching=True):
    cfg = EngineConfig(
        model=path,
        prune=PruneConfig(**PLANS[plan]),
        kv_cache_memory_mb=4,
        block_size=BLOCK,
        enable_prefix_caching=caching,
    )
    return LLMEngine(cfg, model=load_model(path), model_path=path)


class Split:
    """A prefill worker (with or without its prefix cache) and a decode worker over a fake link."""

    def __init__(self, path, plan, prefill_cache=True, max_local=0, chunk_tokens=None):
        self.engine = _engine(path, plan)
        self.key = self.engine.prefix_key_for(self.engine.plan)
        assert self.key == self.engine.prefix_key  # the decode engine names its own prefills alike
        self.decode = DecodeWorker(self.engine, transfer_timeout_s=10, max_local_prefill_tokens=max_local)
        a, b = FakeTransport.pair()
        arch = self.engine.arch
        self.sender = KVSender(a, arch.num_layers, (arch.num_kv_heads, arch.head_dim), torch.float32, 10)
        self.decode.attach_link(0, b)
        model = load_model(path, prefill_only_plan=self.engine.plan)
        self.cache = PrefillCache(arch, 64, BLOCK, torch.float32, torch.device("cpu")) if prefill_cache else None
        chunking = (
            {} if chunk_tokens is None else dict(max_num_batched_tokens=chunk_tokens, enable_chunked_prefill=True)
        )
        self.prefill = PrefillWorker(
            model,
            self.engine.plan,
            {0: self.sender},
            cache=self.cache,
            prefix_key=lambda p: PrefixKey(plan_cache_key(path, p), not p.skip_layers),
            **chunking,
        )
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=w.run, args=(self.stop,), daemon=True) for w in (self.prefill, self.decode)
        ]
        for t in self.threads:
            t.start()

    def run(self, rid, prompt, n, reuse=True):
        """One request to the end; returns (tokens, its reservation, its prefill outcome or None)."""
        events, outcome = [], []
        res = self.decode.reserve(rid, prompt, _greedy(n), 0, events.append, prefix_key=self.key if reuse else None)
        assert res is not None
        if res.transfer_id:
            task = PrefillTask(rid, res.transfer_id, 0, prompt[:-1], outcome.append, send_start=res.num_cached_tokens)
            self.prefill.submit(task)
        deadline = time.monotonic() + 60
        while not any(isinstance(e, Tokens) and e.is_finished for e in events):
            assert not any(isinstance(e, Failed) for e in events), events
            assert time.monotonic() < deadline, "request did not finish"
            time.sleep(0.005)
        if res.transfer_id:
            while not outcome:
                time.sleep(0.005)
            assert outcome[0].error is None
        return [t for e in events if isinstance(e, Tokens) for t in e.token_ids], res, (outcome or [None])[0]

    def close(self):
        self.sender.close()
        self.stop.set()
        for t in self.threads:
            t.join(2)
        bm = self.engine.blocks
        assert bm.num_free_blocks == bm.num_blocks and all(c == 0 for c in bm.ref_counts)  # no leak
        if self.cache is not None:
            assert all(c == 0 for c in self.cache.blocks.ref_counts)


def _workload():
    """A shared 21-token system prompt under three users, then a follow-up turn of the first."""
    sys = _ids(1, 21)
    return sys, [sys + _ids(2, 6), sys + _ids(3, 11), sys[:9] + _ids(4, 3)]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("plan", ["pop", "full"])
@pytest.mark.parametrize("chunked", [False, True])
def test_warm_split_equals_cold_engine_and_sends_only_the_uncached_suffix(tiny_ckpt, family, plan, chunked):
    path = tiny_ckpt(family)
    cold = _engine(path, plan, caching=False)
    sys, prompts = _workload()
    split = Split(path, plan, chunk_tokens=8 if chunked else None)
    try:
        sent = 0
        answers = []
        for i, prompt in enumerate(prompts):
            tokens, res, outcome = split.run(f"u{i}", prompt, 6)
            assert tokens == cold.generate([prompt], _greedy(6))[0].token_ids, f"user {i}"
            # Held on the decode worker: the full blocks of the longest prefix shared with an earlier
            # request's prompt prefix (first user: none; then the system prompt's 20 of 21; then 8).
            assert res.num_cached_tokens == [0, 20, 8][i]
            sent += len(prompt) - 1 - res.num_cached_tokens
            assert split.decode.num_transferred_tokens == sent
            # The prefill worker had encoded the same blocks before: it starts after them too.
            assert outcome.num_cached_tokens == [0, 20, 8][i]
            answers.append(tokens)
        # Multi-turn: the first user's next turn extends its prompt with its answer.
        follow_up = prompts[0] + answers[0] + _ids(5, 4)
        tokens, res, _ = split.run("u0-turn2", follow_up, 6)
        assert tokens == cold.generate([follow_up], _greedy(6))[0].token_ids
        # POP: only what the first turn's pruned prefill wrote (26 prefix tokens: 6 blocks); the
        # answer's blocks hold full-model K/V a cold POP prefill would not write. Full model: the
        # answer's blocks too (27 + 6 tokens, of which 32 computed: 8 blocks).
        assert res.num_cached_tokens == (6 if plan == "pop" else 8) * BLOCK
        assert split.decode.num_transferred_tokens == sent + len(follow_up) - 1 - res.num_cached_tokens
    finally:
        split.close()


@pytest.mark.parametrize("plan", ["pop", "full"])
def test_prefill_worker_sends_cached_kv_the_decode_worker_lacks(tiny_ckpt, plan):
    """The decode worker reuses nothing (reserved without a key) while the prefill worker has the
    system prompt cached: the hits go on the wire from its pool, the rest is encoded; the decode
    worker's tokens equal the cold engine's."""
    path = tiny_ckpt("qwen3")
    cold = _engine(path, plan, caching=False)
    _, prompts = _workload()
    split = Split(path, plan)
    try:
        for i, prompt in enumerate(prompts[:2]):
            tokens, res, outcome = split.run(f"r{i}", prompt, 5, reuse=False)
            assert res.num_cached_tokens == 0 and outcome.num_cached_tokens == [0, 20][i]
            assert tokens == cold.generate([prompt], _greedy(5))[0].token_ids
        assert split.decode.num_transferred_tokens == sum(len(p) - 1 for p in prompts[:2])
        assert split.cache.num_hit_tokens == 20
    finally:
        split.close()


def test_decode_worker_holding_more_than_the_prefill_worker_gets_only_the_rest(tiny_ckpt):
    """No prefill-side cache: the prefill worker encodes the whole prefix but sends only what the
    decode worker lacks."""
    path = tiny_ckpt("llama")
    cold = _engine(path, "pop", caching=False)
    _, prompts = _workload()
    split = Split(path, "pop", prefill_cache=False)
    try:
        split.run("a", prompts[0], 4)
        tokens, res, outcome = split.run("b", prompts[1], 4)
        assert res.num_cached_tokens == 20 and outcome.num_cached_tokens == 0
        assert tokens == cold.generate([prompts[1]], _greedy(4))[0].token_ids
        assert split.decode.num_transferred_tokens == len(prompts[0]) - 1 + len(prompts[1]) - 1 - 20
    finally:
        split.close()


@pytest.mark.parametrize("plan", ["pop", "full"])
def test_a_short_uncached_rest_is_prefilled_on_the_decode_worker(tiny_ckpt, plan):
    """``max_local_prefill_tokens``: the decode worker prefills a short uncached rest itself under
    the same plan; nothing is transferred and the tokens equal the cold engine's. A longer rest, or
    a cold prompt, still goes to the prefill worker."""
    path = tiny_ckpt("llama")
    cold = _engine(path, plan, caching=False)
    sys, prompts = _workload()
    split = Split(path, plan, max_local=8)
    try:
        _, first, _ = split.run("cold", prompts[0], 5)
        assert not first.is_local and split.decode.num_transferred_tokens == len(prompts[0]) - 1
        before = split.decode.num_transferred_tokens
        near = sys + _ids(9, 4)  # 24 prefix tokens, 20 held: 4 to compute
        tokens, res, outcome = split.run("near", near, 5)
        assert res.is_local and res.transfer_id == 0 and outcome is None
        assert split.decode.num_transferred_tokens == before and split.decode.num_local_prefill_tokens == 4
        assert tokens == cold.generate([near], _greedy(5))[0].token_ids
        far = sys + _ids(10, 12)  # 32 prefix tokens, 20 held: 12 > 8 go to the prefill worker
        tokens, res, _ = split.run("far", far, 5)
        assert not res.is_local and split.decode.num_transferred_tokens == before + 12
        assert tokens == cold.generate([far], _greedy(5))[0].token_ids
    finally:
        split.close()


def test_a_prefix_cached_under_another_plan_is_no_hit(tiny_ckpt):
    """Blocks the decode worker holds from POP prefills are not offered to a full-model prefix."""
    path = tiny_ckpt("llama")
    split = Split(path, "pop")
    try:
        _, prompts = _workload()
        split.run("pop", prompts[0], 3)
        full = PruneConfig(no_prune=True).resolve(split.engine.arch.num_layers)
        assert split.decode.num_cached_prefix_tokens(prompts[0], split.key) == 24
        assert split.decode.num_cached_prefix_tokens(prompts[0], split.engine.prefix_key_for(full)) == 0
    finally:
        split.close()


def test_kv_aware_choice_weighs_overlap_against_load():
    # 10-block request: worker 1 holds 8 of them, worker 0 none; both idle -> the overlap wins.
    assert kv_aware_choice(10, [0, 8], [0, 0]) == 1
    # ... unless worker 1 is busy enough: 2 + 20 active > 10 + 0.
    assert kv_aware_choice(10, [0, 8], [0, 20]) == 0
    # A heavier overlap weight brings it back (2 * 2 + 20 < 2 * 10 + 0 is false; 3x: 6 + 20 < 30).
    assert kv_aware_choice(10, [0, 8], [0, 20], overlap_weight=3.0) == 1
    assert kv_aware_choice(4, [0, 0, 0], [3, 1, 1]) == 1  # no overlap anywhere: least active, first of ties


# ---- served: 1P2D through gRPC -------------------------------------------------------------------
def test_served_split_reuses_prefixes_and_routes_to_them(ray_instance, tiny_ckpt):
    """A 1P2D POP server: warm requests equal the cold engine token for token, ``cached_tokens``
    says what the decode worker held, ``kv_transfer_bytes_total`` counts only the uncached
    suffixes, and the router sends a warm request to the decode worker holding its prefix."""
    import urllib.request

    import grpc
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    from pop_disagg._proto import generation_pb2 as pb
    from pop_disagg._proto import generation_pb2_grpc as pb_grpc
    from pop_disagg.config import ServeConfig
    from pop_disagg.server.app import BackgroundServer

    path = tiny_ckpt("qwen2")
    engine = EngineConfig(model=path, kv_cache_memory_mb=2, block_size=BLOCK, max_model_len=256)
    cfg = ServeConfig(engine=engine, num_decode=2, max_local_prefill_tokens=0, transfer_timeout_s=20)
    cold = LLMEngine(engine.model_copy(update={"enable_prefix_caching": False}), model=load_model(path))
    srv = BackgroundServer(cfg, metrics_port=0, kv_poll_interval_s=0.1)
    kv_bytes = cold.arch.kv_bytes_per_token(4)

    def scrape():
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.server.metrics_port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}

    sys, prompts = _workload()
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            before = scrape()["pop_disagg:kv_transfer_bytes_total"]
            sent = 0
            for i, prompt in enumerate(prompts):
                resp = stub.Generate(
                    pb.GenerateRequest(prompt_token_ids=prompt, max_new_tokens=6, ignore_eos=True), timeout=60
                )
                assert list(resp.token_ids) == cold.generate([prompt], _greedy(6))[0].token_ids, f"user {i}"
                assert resp.usage.cached_tokens == [0, 20, 8][i]
                sent += len(prompt) - 1 - resp.usage.cached_tokens
            assert scrape()["pop_disagg:kv_transfer_bytes_total"] - before == sent * kv_bytes
        # Every request went to the worker that held the system prompt: only it received K/V.
        stats = [ray.get(d.stats.remote()) for d in srv.deployment.decode]
        assert sorted(s["kv_transfer_tokens"] for s in stats) == [0, sent]
    finally:
        srv.stop()
