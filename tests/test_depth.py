"""Depth as a serving knob: plan families, per-request plans, the SLO controller.

A family's plans are nested; its prefill-only instance (built for the mildest plan) gives, under
each plan, the K/V a prefill-only instance built for that plan alone gives; a prefill step that
mixes plans sends what one plan per step sends; the controller goes deeper as its (fake) queue
grows and back to the mildest plan as it drains; and through gRPC a served family answers each
``prune_ratio`` exactly as the single-process engine under that plan, and refuses unknown ones.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pop_disagg.cli import main
from pop_disagg.config import EngineConfig, PruneConfig
from pop_disagg.disagg.decode_worker import DecodeWorker, Failed, Tokens
from pop_disagg.disagg.kv_transfer import FakeTransport, KVSender
from pop_disagg.disagg.prefill_worker import PrefillTask, PrefillWorker
from pop_disagg.engine.engine import LLMEngine
from pop_disagg.engine.sampling import SamplingParams
from pop_disagg.models.attention import PrefillAttention
from pop_disagg.models.loader import load_model
from pop_disagg.pop.plan import PlanError, PlanFamily, PrunePlan, read_plan_file
from pop_disagg.server.control.depth import DepthController, kv_share, plan_costs

# Tiny checkpoints have 6 layers: these ratios skip 1, 2 and 3 of them.
RATIOS = (0.17, 0.34, 0.5)


def _prompts(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in lens]


# ---- families ------------------------------------------------------------------------------------
def test_family_plans_are_nested_and_round_trip(tmp_path):
    fam = PlanFamily.from_ratios(30, [0.33, 0.2, 0.5, 0.4])  # SmolLM2's depth
    assert fam.ratios == (0.2, 0.33, 0.4, 0.5) and fam.default_ratio == 0.33
    assert [len(p.skip_layers) for p in fam.plans] == [6, 9, 12, 15]
    for milder, deeper in zip(fam.plans, fam.plans[1:]):
        assert set(milder.skip_layers) < set(deeper.skip_layers)
    assert fam.union_plan == fam.plans[0] and fam.default_plan == fam.plans[1]
    assert fam.plan_for(0.4000001) == fam.plans[2]
    fam.save(tmp_path / "f.json")
    assert (
        isinstance(read_plan_file(tmp_path / "f.json"), PlanFamily) and PlanFamily.load(tmp_path / "f.json", 30) == fam
    )
    with pytest.raises(PlanError, match="30-layer"):
        PlanFamily.load(tmp_path / "f.json", 6)
    with pytest.raises(PlanError, match="not nested"):
        PlanFamily(
            ratios=(0.2, 0.4),
            plans=(PrunePlan(num_layers=6, skip_layers=(5,)), PrunePlan(num_layers=6, skip_layers=(3, 4))),
            default_ratio=0.2,
        )
    with pytest.raises(PlanError, match="same plan"):  # 6 * 0.2 and 6 * 0.3 both floor to one layer
        PlanFamily.from_ratios(6, [0.2, 0.3])
    with pytest.raises(PlanError, match="allowed: 0.2, 0.33, 0.4, 0.5"):
        fam.plan_for(0.25)


def test_plan_cli_writes_a_nested_importance_family(tmp_path):
    from pop_disagg.calib.importance import CalibrationSettings, ImportanceProfile

    prefill = (0.9, 0.05, 0.7, 0.01, 0.3, 0.02, 0.5, 0.8, 0.4, 0.6)
    settings = CalibrationSettings(num_samples=1, max_new_tokens=1, max_prompt_tokens=1)
    ImportanceProfile(model="m", num_layers=10, settings=settings, prefill=prefill, decode=(1.0,) * 10).save(
        tmp_path / "p.json"
    )
    out = tmp_path / "family.json"
    assert (
        main(
            [
                "plan",
                "--profile",
                str(tmp_path / "p.json"),
                "--ratios",
                "0.2,0.4,0.1",
                "--strategy",
                "importance",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    fam = PlanFamily.load(out, 10)
    assert fam.default_ratio == 0.2 and fam.strategy == "importance" and fam.model == "m"
    assert [p.skip_layers for p in fam.plans] == [(3,), (3, 5), (1, 3, 4, 5)]  # lowest prefill importance first
    assert main(["plan", "--profile", str(tmp_path / "p.json"), "--ratios", "0.3,0.5", "--out", str(out)]) == 0
    assert [p.skip_layers for p in PlanFamily.load(out).plans] == [(7, 8, 9), (5, 6, 7, 8, 9)]


FAMILIES = {
    "last": PlanFamily.from_ratios(6, [0.0, *RATIOS]),  # mildest = full: the instance holds every layer
    "importance-like": PlanFamily(  # non-contiguous, growing runs
        ratios=RATIOS,
        plans=tuple(PrunePlan(num_layers=6, skip_layers=s) for s in ((3,), (1, 3), (1, 3, 4))),
        default_ratio=RATIOS[0],
    ),
}


@pytest.mark.parametrize("family", list(FAMILIES), ids=list(FAMILIES))
@pytest.mark.parametrize("arch_name", ["llama", "qwen3", "gemma3"])
def test_family_instance_gives_each_plans_own_kv(tiny_ckpt, arch_name, family):
    """One prefill-only instance for the family == a prefill-only instance built per plan."""
    path, fam = tiny_ckpt(arch_name), FAMILIES[family]
    union = load_model(path, prefill_only_plan=fam.union_plan)
    prompts = _prompts((7, 12))
    cu = [0, 7, 19]
    ids, pos = torch.tensor(prompts[0] + prompts[1]), torch.tensor(list(range(7)) + list(range(12)))

    def kv(model, plan):
        out: dict[int, tuple] = {}
        with torch.no_grad():
            model(
                ids,
                pos,
                PrefillAttention(cu, sink=lambda l, k, v: out.__setitem__(l, (k.clone(), v.clone()))),
                plan=plan,
            )
        return out

    for plan in fam.plans:
        alone = load_model(path, prefill_only_plan=plan)
        want, got = kv(alone, plan), kv(union, plan)
        assert sorted(got) == sorted(want) == list(range(6))
        for layer in want:
            torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-6)
    shallower = PrunePlan(num_layers=6, skip_layers=fam.union_plan.skip_layers[1:])
    if fam.union_plan.skip_layers:
        with pytest.raises(ValueError, match="can only run plans skipping"):
            kv(union, shallower)


# ---- mixed-plan prefill steps ----------------------------------------------------------------------
class Pair:
    """A family prefill worker and a decode worker over a fake link; the prefill loop starts on demand."""

    def __init__(self, path, family: PlanFamily):
        self.engine = LLMEngine(
            EngineConfig(
                model=path,
                prune=PruneConfig(skip_layers=family.default_plan.skip_layers),
                kv_cache_memory_mb=4,
                block_size=4,
            ),
            model=load_model(path),
        )
        self.decode = DecodeWorker(self.engine, transfer_timeout_s=10)
        a, b = FakeTransport.pair()
        arch = self.engine.arch
        self.sender = KVSender(a, arch.num_layers, (arch.num_kv_heads, arch.head_dim), torch.float32, 10)
        self.decode.attach_link(0, b)
        self.prefill = PrefillWorker(
            load_model(path, prefill_only_plan=family.union_plan), family.default_plan, {0: self.sender}
        )
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.decode.run, args=(self.stop,), daemon=True)]
        self.threads[0].start()
        self.events: dict[str, list] = {}
        self.outcomes: dict[str, object] = {}

    def start_prefill(self):
        t = threading.Thread(target=self.prefill.run, args=(self.stop,), daemon=True)
        t.start()
        self.threads.append(t)

    def submit(self, rid, prompt, params, plan):
        res = self.decode.reserve(rid, prompt, params, 0, self.events.setdefault(rid, []).append)
        assert res is not None
        tid = res.transfer_id
        self.prefill.submit(
            PrefillTask(rid, tid, 0, prompt[:-1], lambda o: self.outcomes.__setitem__(o.request_id, o), plan=plan)
        )

    def wait_done(self, rids, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(
                any(isinstance(e, Failed) or (isinstance(e, Tokens) and e.is_finished) for e in self.events.get(r, []))
                for r in rids
            ):
                return
            time.sleep(0.005)
        raise AssertionError(f"requests not finished: {self.events}")

    def tokens(self, rid):
        assert not any(isinstance(e, Failed) for e in self.events[rid]), self.events[rid]
        return [t for e in self.events[rid] if isinstance(e, Tokens) for t in e.token_ids]

    def close(self):
        self.sender.close()
        self.stop.set()
        for t in self.threads:
            t.join(2)


def test_mixed_plan_step_equals_one_plan_per_step(tiny_ckpt):
    path = tiny_ckpt("qwen2")
    fam = PlanFamily.from_ratios(6, list(RATIOS))
    prompts = _prompts((5, 13, 9, 21, 3, 17))
    plans = [fam.plans[i % 3] for i in range(len(prompts))]
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)

    mixed = Pair(path, fam)
    try:
        for i, (p, plan) in enumerate(zip(prompts, plans)):  # all queued before the loop runs: one step
            mixed.submit(f"r{i}", p, params, plan)
        mixed.start_prefill()
        mixed.wait_done([f"r{i}" for i in range(len(prompts))])
        got_mixed = [mixed.tokens(f"r{i}") for i in range(len(prompts))]
        batch_sizes = {o.num_batch_tokens for o in mixed.outcomes.values()}
        # Each plan ran one pass over its own requests' tokens (a step holding all of them).
        assert batch_sizes == {sum(len(p) - 1 for p, q in zip(prompts, plans) if q == plan) for plan in fam.plans}
    finally:
        mixed.close()

    single = Pair(path, fam)
    try:
        single.start_prefill()
        got_single = {}
        for plan in fam.plans:  # one plan per step
            rids = [f"r{i}" for i, q in enumerate(plans) if q == plan]
            for rid in rids:
                single.submit(rid, prompts[int(rid[1:])], params, plan)
            single.wait_done(rids)
            got_single.update({rid: single.tokens(rid) for rid in rids})
    finally:
        single.close()
    assert got_mixed == [got_single[f"r{i}"] for i in range(len(prompts))]
    # And each equals the single-process engine under its plan.
    for plan in fam.plans:
        idx = [i for i, q in enumerate(plans) if q == plan]
        engine = LLMEngine(
            EngineConfig(
                model=path, prune=PruneConfig(skip_layers=plan.skip_layers), kv_cache_memory_mb=4, block_size=4
            ),
            model=load_model(path),
        )
        ref = engine.generate([prompts[i] for i in idx], params)
        assert [got_mixed[i] for i in idx] == [r.token_ids for r in ref]
    assert all(o.error is None for o in mixed.outcomes.values())


# ---- the controller --------------------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _controller(clock, adaptive=True, registry=None, rule="greedy", slo_s=1.0):
    fam = PlanFamily.from_ratios(30, [0.0, 0.2, 0.33, 0.5])
    costs = plan_costs(fam, kv_share(576, 576, 192, 1536))  # SmolLM2's geometry
    return DepthController(
        fam,
        1,
        costs,
        ttft_slo_s=slo_s,
        adaptive=adaptive,
        registry=registry,
        clock=clock,
        log_interval_s=5.0,
        rule=rule,
    )


def test_controller_goes_deeper_as_the_queue_grows_and_back_as_it_drains(caplog):
    from prometheus_client import CollectorRegistry

    clock, registry = FakeClock(), CollectorRegistry()
    ctl = _controller(clock, registry=registry)
    assert ctl.choose(0, 100) == 0  # nothing measured yet: no evidence of pressure
    ctl.on_submit(0, "warm", 100, 0)
    ctl.on_done(0, "warm", prefill_s=0.1, num_batch_tokens=100)  # fake throughput: 1 ms/token at full depth
    assert ctl.seconds_per_token(0) == pytest.approx(1e-3)
    assert ctl.seconds_per_token(3) == pytest.approx(1e-3 * ctl.costs[3] / ctl.costs[0])  # estimated through FLOPs
    ctl.on_submit(0, "deep", 100, 3)
    ctl.on_done(0, "deep", prefill_s=0.03, num_batch_tokens=100)  # ...and measured for the deepest
    assert ctl.seconds_per_token(3) == pytest.approx(3e-4)

    # The fake queue: 20-token requests at full depth (20 ms each) pile up on the worker; a probe
    # of 300 tokens asks for its plan after each one.
    chosen = []
    for i in range(60):
        index = ctl.choose(0, 300)
        predicted = [ctl.predicted_ttft_s(0, 300, j) for j in range(4)]
        # The mildest plan predicted to meet the SLO (or the deepest when none does).
        assert index == next((j for j, t in enumerate(predicted) if t <= 1.0), 3)
        chosen.append(index)
        ctl.on_submit(0, f"q{i}", 20, 0)
        clock.t += 0.1
    assert chosen == sorted(chosen), chosen  # deeper and deeper
    assert set(chosen) == {0, 1, 2, 3} and chosen[-1] == 3

    drained = []
    for i in range(60):  # the queue drains
        ctl.on_done(0, f"q{i}")
        drained.append(ctl.choose(0, 300))
    assert drained == sorted(drained, reverse=True) and drained[-1] == 0, drained
    calls = 1 + 60 + 60
    names = ctl.family.names
    counts = {n: registry.get_sample_value("pop_disagg:prefill_plan_total", {"ratio": n}) for n in names}
    assert sum(counts.values()) == calls
    assert counts[names[3]] == chosen.count(3) + drained.count(3)
    with caplog.at_level(logging.INFO, logger="pop_disagg.serve"):
        clock.t += 5.0
        ctl.choose(
            0, 100, requested_index=ctl.family.index_of(0.5)
        )  # an explicit ratio bypasses the controller and is counted
    assert registry.get_sample_value("pop_disagg:prefill_plan_total", {"ratio": "0.5"}) == counts["0.5"] + 1
    assert any("prefill depth mix" in r.getMessage() and "0.5" in r.getMessage() for r in caplog.records)


def test_fixed_default_without_adaptive_and_overhead_counts():
    clock = FakeClock()
    fam = PlanFamily.from_ratios(30, [0.33, 0.2, 0.5])
    ctl = DepthController(fam, 1, plan_costs(fam, 0.05), clock=clock)
    ctl.on_submit(0, "a", 10_000, 0)
    ctl.on_done(0, "a", prefill_s=10.0, num_batch_tokens=100)
    assert ctl.choose(0, 5000) == fam.index_of(0.33)  # the default, whatever the queue
    with pytest.raises(ValueError, match="TTFT SLO"):
        DepthController(fam, 1, plan_costs(fam, 0.05), adaptive=True)
    adaptive = DepthController(fam, 1, plan_costs(fam, 0.05), ttft_slo_s=0.5, adaptive=True, clock=clock)
    adaptive.on_submit(0, "a", 100, 0)
    adaptive.on_done(0, "a", prefill_s=0.1, num_batch_tokens=100)
    assert adaptive.choose(0, 100) == 0  # 0.1 s predicted
    adaptive.observe_ttft(ttft_s=0.8, queue_s=0.1, prefill_s=0.1)  # 0.6 s spent elsewhere (transfer, decode)
    assert adaptive.predicted_ttft_s(0, 100, 0) == pytest.approx(0.7)
    assert adaptive.choose(0, 100) == 2  # nothing meets 0.5 s: the deepest


def _warm(ctl, per_token=(1e-3, 8e-4, 6.5e-4, 4.5e-4)):
    for i, s in enumerate(per_token):
        ctl.s_per_token[i] = s


def test_lookahead_plans_for_the_load_where_greedy_spends_the_slack():
    # 300-token requests every 0.25 s: full depth needs 0.3 s each (load 1.2, the queue grows
    # without bound), 0.2 needs 0.285 s (load 1.14), 0.33 0.195 s (load 0.78). An empty queue:
    # greedy takes full depth (0.3 s < 1 s for this request); lookahead sees the 32nd follower
    # at 1.9 s (full) and 1.4 s (0.2) on those plans, and takes 0.33.
    for rule, want in (("greedy", 0), ("lookahead", 2)):
        clock = FakeClock()
        ctl = _controller(clock, rule=rule)
        _warm(ctl, (1e-3, 9.5e-4, 6.5e-4, 4.5e-4))
        for _ in range(10):  # the traffic so far: its rate and length
            ctl.choose(0, 300, requested_index=3)
            clock.t += 0.25
        assert ctl.mean_gap_s == pytest.approx(0.25) and ctl.mean_tokens == pytest.approx(300)
        assert ctl.choose(0, 300) == want, rule
    # A light load (one request every 2 s): both rules take full depth.
    clock = FakeClock()
    ctl = _controller(clock, rule="lookahead")
    _warm(ctl)
    for _ in range(5):
        ctl.choose(0, 300, requested_index=3)
        clock.t += 2.0
    assert ctl.choose(0, 300) == 0


@settings(max_examples=60, deadline=None)
@given(
    per_token=st.lists(st.floats(1e-5, 1e-2), min_size=4, max_size=4),
    queued=st.lists(st.integers(1, 4000), max_size=6),
    gaps=st.lists(st.floats(0.01, 5.0), min_size=1, max_size=8),
    n=st.integers(1, 4000),
    rule=st.sampled_from(["lookahead", "greedy"]),
)
def test_unreachable_slo_sends_the_deepest_and_infinite_slo_the_full_model(per_token, queued, gaps, n, rule):
    for slo_s, want in ((1e-9, 3), (math.inf, 0)):
        clock = FakeClock()
        ctl = _controller(clock, rule=rule, slo_s=slo_s)
        _warm(ctl, sorted(per_token, reverse=True))
        for i, (tokens, gap) in enumerate(zip(queued, gaps * len(queued))):
            ctl.choose(0, tokens, requested_index=i % 4)
            ctl.on_submit(0, f"q{i}", tokens, i % 4)
            clock.t += gap
        assert ctl.choose(0, n) == want


def test_replay_is_deterministic_and_the_controller_is_on_the_pareto_front():
    from pop_disagg.bench.replay import CostModel, pareto_check, poisson_trace, replay

    costs = CostModel(
        ratios=(0.0, 0.2, 0.34, 0.5),
        num_layers=30,
        prefill_s_per_token=(3.9e-3, 3.1e-3, 2.7e-3, 1.9e-3),
        prefill_pass_s=0.02,
        transfer_fixed_s=0.02,
        transfer_s_per_token=1e-5,
        decode_batches=(1, 16),
        decode_step_s=(0.045, 0.17),
        quality=(1.0, 1.02, 1.17, 1.89),
    )
    trace = poisson_trace(1.3, 400, 192, 4, seed=1, input_sigma=0.5)
    runs = [replay(trace, costs, mode, 2.0, noise_cv=0.1) for mode in ("0", "0.2", "0.34", "0.5", "lookahead")]
    again = replay(trace, costs, "lookahead", 2.0, noise_cv=0.1)
    assert again.summary == runs[-1].summary  # same trace, same seed: the same numbers
    by_mode = {r.mode: r.summary for r in runs}
    assert by_mode["0"]["slo_attainment"] < by_mode["0.5"]["slo_attainment"]  # load the full model cannot carry
    assert 0 < by_mode["lookahead"]["mix"][1] + by_mode["lookahead"]["mix"][2]  # the middle plans are used
    ok, why = pareto_check(runs)
    assert ok, why


# ---- configuration ---------------------------------------------------------------------------------
def test_serve_config_validates_depth_options(tmp_path):
    import argparse

    from pop_disagg.commands.serve import add_serve_args, serve_config
    from pop_disagg.config import ServeConfig

    p = argparse.ArgumentParser()
    add_serve_args(p)
    cfg = serve_config(
        p.parse_args(["--prune-ratios", "0.33,0.2,0.5", "--adaptive-depth", "--ttft-slo-ms", "500", "--threads", "1"])
    )
    assert cfg.prune_ratios == (0.33, 0.2, 0.5) and cfg.adaptive_depth and cfg.ttft_slo_ms == 500
    assert cfg.worker_engine.prune == PruneConfig(ratio=0.33)  # the first ratio is the default
    fam_file = tmp_path / "family.json"
    PlanFamily.from_ratios(6, list(RATIOS)).save(fam_file)
    cfg = serve_config(p.parse_args(["--prune-plan", str(fam_file), "--threads", "1"]))
    assert cfg.prune_family == str(fam_file) and cfg.engine.prune == PruneConfig()
    assert cfg.worker_engine.prune.skip_layers == (5,)
    for bad, words in (
        (
            dict(prune_ratios=(0.2, 0.5), kv_correction="kv.safetensors"),
            "kv_correction: not supported with a plan family",
        ),
        (dict(prune_ratios=(0.2, 0.5), topology="colocated"), "needs --topology disaggregated"),
        (dict(prune_ratios=(0.2, 0.5), adaptive_depth=True), "--adaptive-depth needs --ttft-slo-ms"),
        (dict(prune_ratios=(0.2,), adaptive_depth=True, ttft_slo_ms=100), "two or more plans"),
        (dict(ttft_slo_ms=100), "give both"),
    ):
        with pytest.raises(ValueError, match=words):
            ServeConfig(**bad)


# ---- end to end through gRPC -------------------------------------------------------------------------
def test_served_family_per_request_depth_equals_engine(tmp_path_factory):
    import ray

    from pop_disagg._proto import generation_pb2 as pb
    from pop_disagg._proto import generation_pb2_grpc as pb_grpc
    from pop_disagg.config import ServeConfig
    from pop_disagg.models.tiny import make_tiny_model
    from pop_disagg.server.app import BackgroundServer

    path = str(make_tiny_model(tmp_path_factory.mktemp("depth-tiny"), "qwen2", seed=3))
    engine_cfg = EngineConfig(model=path, kv_cache_memory_mb=2, block_size=4, max_model_len=256)
    config = ServeConfig(engine=engine_cfg, prune_ratios=(0.34, 0.17, 0.5), transfer_timeout_s=20)
    fam = PlanFamily.from_ratios(6, list(config.prune_ratios))
    prompts = _prompts((9, 17, 40, 12, 2, 25))
    ratios = [None, 0.17, 0.34, 0.5, 0.5, 0.17]  # None: the default (0.34)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    by_plan = {}
    for r, plan in zip(fam.ratios, fam.plans):
        ref = LLMEngine(
            engine_cfg.model_copy(update={"prune": PruneConfig(skip_layers=plan.skip_layers)}),
            model=load_model(path),
            model_path=path,
        )
        by_plan[r] = [o.token_ids for o in ref.generate(prompts, params)]
    expected = [by_plan[0.34 if r is None else r][i] for i, r in enumerate(ratios)]
    differ = sum(len({tuple(by_plan[r][i]) for r in fam.ratios}) > 1 for i in range(len(prompts)))
    assert differ >= 3, "the plans give the same tokens: the test could not see a request run at the wrong depth"

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        srv = BackgroundServer(config, http_port=0)
        try:
            with grpc.insecure_channel(srv.address) as channel:
                stub = pb_grpc.GenerationStub(channel)

                def ask(i):
                    msg = pb.GenerateRequest(prompt_token_ids=prompts[i], max_new_tokens=6, ignore_eos=True)
                    if ratios[i] is not None:
                        msg.prune_ratio = ratios[i]
                    return stub.Generate(msg, timeout=60)

                with ThreadPoolExecutor(len(prompts)) as pool:  # concurrent: plans mix in prefill steps
                    got = list(pool.map(ask, range(len(prompts))))
                for i, g in enumerate(got):
                    served = 0.34 if ratios[i] is None else ratios[i]
                    assert list(g.token_ids) == expected[i], f"request {i} at ratio {served}"
                    assert g.timings.prune_ratio == pytest.approx(served)
                    assert g.timings.num_skipped_layers == len(fam.plan_for(served).skip_layers)
                one_token = stub.Generate(
                    pb.GenerateRequest(prompt_token_ids=[7], max_new_tokens=2, prune_ratio=0.5), timeout=60
                )
                assert not one_token.timings.HasField("prune_ratio")  # nothing to prefill

                info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30)
                assert list(info.prune_ratios) == pytest.approx(
                    [0.17, 0.34, 0.5]
                ) and info.default_prune_ratio == pytest.approx(0.34)
                assert list(info.skip_layers) == [4, 5] and info.prefill_weight_bytes > 0 and not info.adaptive_depth
                for bad in (0.25, -1.0, float("nan")):
                    with pytest.raises(grpc.RpcError) as err:
                        stub.Generate(
                            pb.GenerateRequest(prompt_token_ids=[5, 6, 7], max_new_tokens=2, prune_ratio=bad),
                            timeout=30,
                        )
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert (
                        err.value.details().startswith("prune_ratio")
                        and "allowed: 0.17, 0.34, 0.5" in err.value.details()
                    )
            # The same knob on the OpenAI HTTP API (an extension, as top_k): same tokens as gRPC.
            body = dict(
                model=config.engine.model,
                prompt=prompts[3],
                max_tokens=6,
                temperature=0,
                ignore_eos=True,
                return_token_ids=True,
            )
            reply = httpx.post(f"{srv.http_url}/v1/completions", json={**body, "prune_ratio": 0.17}, timeout=60)
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["token_ids"] == by_plan[0.17][3]
            reply = httpx.post(f"{srv.http_url}/v1/completions", json={**body, "prune_ratio": 0.25}, timeout=30)
            assert reply.status_code == 400 and reply.json()["error"]["param"] == "prune_ratio"
            registry = srv.server.router.depth.registry
            assert registry is srv.server.metrics.registry  # the counter is on the server's /metrics
            counts = {
                r: registry.get_sample_value("pop_disagg:prefill_plan_total", {"ratio": f"{r:g}"}) for r in fam.ratios
            }
            assert counts == {0.17: 3.0, 0.34: 2.0, 0.5: 2.0}
        finally:
            srv.stop()
    finally:
        ray.shutdown()
