"""Stage-aware importance with virtual gates: gradients are right, gates agree with POP, and the
calibrate / plan commands produce files that generate runs with."""

from __future__ import annotations

import json

import pytest
import torch

from pop_disagg.calib.data import encode_prompt, read_prompts
from pop_disagg.calib.gates import gate_gradients, gated_hidden, response_logits, response_loss, unit_gates
from pop_disagg.calib.importance import CalibrationSettings, ImportanceProfile, plan_from_profile
from pop_disagg.cli import main
from pop_disagg.config import EngineConfig, PruneConfig
from pop_disagg.engine.engine import LLMEngine
from pop_disagg.engine.sampling import SamplingParams
from pop_disagg.models.attention import PrefillAttention
from pop_disagg.models.loader import load_model
from pop_disagg.pop.plan import PrunePlan


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    """ckpt(arch) -> folder of a tiny random checkpoint (the session's, from conftest.py)."""
    return tiny_ckpt


def _ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (n,), generator=g).tolist()


# ---- gradients -----------------------------------------------------------------------------------
def test_gate_gradient_matches_finite_difference(ckpt):
    # float32: the norms and logits compute in float32 whatever the weights, so a float64 model
    # would not buy precision. A central difference with eps = 1e-2 has truncation error O(eps^2)
    # and float32 rounding ~ ulp(loss) / eps, both well under the tolerance.
    model = load_model(ckpt("llama"))
    prompt, response = _ids(9, 0), _ids(5, 1)
    grad_pre, grad_dec, _ = gate_gradients(model, prompt, response)
    eps = 1e-2
    for stage, grad in ((0, grad_pre), (1, grad_dec)):
        for layer in (0, 3, 5):
            values = []
            for sign in (1, -1):
                gates = [g.detach().clone() for g in unit_gates(model)]
                gates[stage][layer] += sign * eps
                with torch.no_grad():
                    values.append(float(response_loss(model, prompt, response, *gates)))
            fd = (values[0] - values[1]) / (2 * eps)
            assert grad[layer].item() == pytest.approx(fd, rel=5e-3, abs=3e-4), (stage, layer)
    assert grad_pre.abs().max() > 0.05 and grad_dec.abs().max() > 0.05, "gradients too small to test against"


def test_identity_layer_and_one_token_prompt_get_zero_importance(ckpt):
    model = load_model(ckpt("llama"))
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    grad_pre, grad_dec, _ = gate_gradients(model, _ids(8, 2), _ids(4, 3))
    assert grad_pre[2].item() == 0.0 and grad_dec[2].item() == 0.0
    assert (grad_pre[[0, 1, 3]] != 0).all() and (grad_dec != 0).sum() == 5

    # One prompt token: it is the boundary token (the first decode step); nothing is prefill.
    grad_pre, grad_dec, _ = gate_gradients(load_model(ckpt("llama")), _ids(1, 4), _ids(4, 5))
    assert torch.equal(grad_pre, torch.zeros_like(grad_pre))
    assert (grad_dec != 0).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_unit_gates_reproduce_ungated_forward_bit_for_bit(ckpt, dtype):
    model = load_model(ckpt("gemma3"), dtype)
    ids = torch.tensor(_ids(13, 6))
    pos = torch.arange(13)
    # The ungated forward in the same autograd mode as the gated one: with autograd off, inference
    # takes other kernels (OpenBLAS GEMMs on AMD CPUs, in-place ops; models/cpu_blas.py), which
    # agree to float32 rounding, not bit for bit.
    with torch.enable_grad():
        plain = model(ids, pos, PrefillAttention([0, 13]))
    assert not plain.requires_grad
    g_pre, g_dec = unit_gates(model)
    gated = gated_hidden(model, ids, 6, g_pre, g_dec)
    assert torch.equal(gated.detach(), plain)
    with torch.inference_mode():
        served = model(ids, pos, PrefillAttention([0, 13]))
    torch.testing.assert_close(served, plain, atol=1e-4, rtol=1e-4)
    gate_gradients(model, ids[:6].tolist(), ids[6:].tolist())
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


# ---- gates and POP are one idea -------------------------------------------------------------------
def _pop_response_logits(
    path: str, model, skip: tuple[int, ...], prompt: list[int], response: list[int]
) -> torch.Tensor:
    """Logits of each response token from the engine's real POP path: pruned prefill of x_1..x_{N-1}
    with the plan, then full-model decode steps feeding x_N and the given response tokens."""
    cfg = EngineConfig(model=path, prune=PruneConfig(skip_layers=skip), kv_cache_memory_mb=8, block_size=4)
    engine = LLMEngine(cfg, model=model, model_path=path)
    engine.add_request(prompt, SamplingParams(max_new_tokens=len(response)))
    batch = engine.scheduler.schedule()
    (req,) = batch.prefill
    assert engine.runner.prefill([req], [len(prompt) - 1]) is None  # boundary handling: nothing sampled
    rows = []
    for tok in response:
        # Blocks come on demand: each decode step is scheduled, so the request gets its next block.
        assert engine.scheduler.schedule().decode == [req]
        rows.append(engine.runner.decode_logits([req])[0])
        req.output_token_ids.append(tok)  # teacher forcing: the next step feeds this token
    return torch.stack(rows)


@pytest.mark.parametrize("arch,skip", [("llama", (4, 5)), ("qwen2", (1, 3, 4)), ("gemma3", (2, 3, 5))])
def test_prefill_gates_at_zero_equal_pop(ckpt, arch, skip):
    path = ckpt(arch)
    model = load_model(path)
    prompt, response = _ids(19, 7), _ids(6, 8)  # 19 > gemma3's sliding window of 8
    g_pre, g_dec = (g.detach() for g in unit_gates(model))
    g_pre[list(skip)] = 0.0
    with torch.no_grad():
        gated = response_logits(model, prompt, response, g_pre, g_dec)
        full = response_logits(model, prompt, response, *(g.detach() for g in unit_gates(model)))
    pop = _pop_response_logits(path, model, skip, prompt, response)
    assert (gated - full).abs().max() > 1e-2, "skipping changed nothing: the test would be vacuous"
    torch.testing.assert_close(gated, pop, rtol=1e-4, atol=1e-4)


# ---- plans ---------------------------------------------------------------------------------------
def _profile(prefill, decode=None, model="m") -> ImportanceProfile:
    n = len(prefill)
    settings = CalibrationSettings(num_samples=1, max_new_tokens=1, max_prompt_tokens=1)
    return ImportanceProfile(
        model=model, num_layers=n, settings=settings, prefill=tuple(prefill), decode=tuple(decode or [1.0] * n)
    )


def test_plan_strategies_through_cli(tmp_path):
    prefill = [0.9, 0.05, 0.7, 0.01, 0.3, 0.02, 0.5, 0.8, 0.4]
    _profile(prefill, model="some/ckpt").save(tmp_path / "profile.json")
    out = tmp_path / "plan.json"
    assert (
        main(["plan", "--profile", str(tmp_path / "profile.json"), "--strategy", "importance", "--out", str(out)]) == 0
    )
    plan = PrunePlan.load(out, 9)
    assert plan.skip_layers == (1, 3, 5)  # the three lowest prefill scores
    assert plan.model == "some/ckpt"
    assert main(["plan", "--profile", str(tmp_path / "profile.json"), "--ratio", "0.25", "--out", str(out)]) == 0
    assert PrunePlan.load(out).skip_layers == (7, 8)  # last floor(9 * 0.25)
    assert plan_from_profile(_profile([0.0] * 6), 0.5, "importance").skip_layers == (3, 4, 5)  # ties: deepest


def test_generate_rejects_a_plan_for_another_model(ckpt, tmp_path, capsys):
    path = ckpt("llama")
    good = tmp_path / "good.json"
    assert main(["plan", "--profile", str(_save(_profile([0.5] * 6), tmp_path / "p6.json")), "--out", str(good)]) == 0
    assert (
        main(
            [
                "generate",
                "--model",
                path,
                "--prompt-ids",
                "5,6,7",
                "--max-new-tokens",
                "2",
                "--prune-plan",
                str(good),
                "--json",
            ]
        )
        == 0
    )
    capsys.readouterr()

    wrong = tmp_path / "wrong.json"
    PrunePlan(num_layers=9, skip_layers=(6, 7, 8), model="other").save(wrong)
    out_of_range = tmp_path / "range.json"
    out_of_range.write_text(json.dumps({"num_layers": 6, "skip_layers": [9]}))
    for plan_file, words in (
        (wrong, f"{wrong}: plan is for a 9-layer model, this model has 6 layers"),
        (out_of_range, "out of range"),
    ):
        assert main(["generate", "--model", path, "--prompt-ids", "5,6,7", "--prune-plan", str(plan_file)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err


def _save(profile: ImportanceProfile, path):
    profile.save(path)
    return path


# ---- data and the calibrate command --------------------------------------------------------------
def test_read_prompts_reports_bad_records(tmp_path, ckpt):
    f = tmp_path / "d.jsonl"
    f.write_text(
        '{"prompt": "The quick brown fox"}\nnot json\n\n{"messages": [{"role": "user", "content": "Hello"}]}\n{"foo": 1}\n{"prompt": ""}\n'
    )
    loaded = read_prompts(f)
    assert [r.line for r in loaded.records] == [1, 4]
    assert [s.split(":")[1] for s in loaded.skipped] == ["2", "5", "6"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt("llama"))
    chat = encode_prompt(loaded.records[1], tok, 1000)
    assert tok.decode(chat).endswith("<|assistant|>")
    assert encode_prompt(loaded.records[1], tok, 3) == chat[-3:]

    text = tmp_path / "t.txt"
    text.write_text("first prompt\n\nsecond prompt\n")
    assert [r.prompt for r in read_prompts(text).records] == ["first prompt", "second prompt"]
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="empty"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "allbad.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(ValueError, match="no usable prompts"):
        read_prompts(tmp_path / "allbad.jsonl")


def test_calibrate_cli_writes_profile_and_plot(ckpt, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(
        '{"prompt": "Hello, world! How are you"}\n[1]\n{"messages": [{"role": "user", "content": "Once upon a time"}]}\n{"prompt": "Keys and values"}\n'
    )
    out, png = tmp_path / "profile.json", tmp_path / "importance.png"
    argv = [
        "calibrate",
        "--model",
        ckpt("qwen3"),
        "--data",
        str(data),
        "--num-samples",
        "2",
        "--max-new-tokens",
        "4",
        "--out",
        str(out),
        "--plot",
        str(png),
        "--log-scale",
        "--no-progress",
    ]
    assert main(argv) == 0
    assert f"{data}:2:" in capsys.readouterr().err
    profile = ImportanceProfile.load(out)
    assert profile.num_layers == 6 and len(profile.prefill) == len(profile.decode) == 6
    assert profile.settings.num_samples == 2 and profile.settings.max_new_tokens == 4
    # The last layer's prompt positions feed nothing the response reads: prefill importance is 0.
    assert profile.prefill[-1] == 0.0 and all(v > 0 for v in profile.prefill[:-1])
    assert all(v > 0 for v in profile.decode)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Same seed, same profile: responses are sampled with seed + i.
    assert main(argv[:-4] + ["--out", str(tmp_path / "again.json"), "--no-progress"]) == 0
    assert ImportanceProfile.load(tmp_path / "again.json").decode == profile.decode

    (tmp_path / "empty.jsonl").write_text("")
    assert (
        main(["calibrate", "--model", ckpt("qwen3"), "--data", str(tmp_path / "empty.jsonl"), "--out", str(out)]) == 2
    )
    assert "empty" in capsys.readouterr().err
