"""The CPU GEMM switch (``models/cpu_blas.py``): oneDNN on prepacked weights and OpenBLAS through
numpy compute what torch's GEMM does, follow in-place edits of the weights, use torch's thread
count, and run only where they are valid."""

from __future__ import annotations

import pytest
import torch

from pop_disagg.config import EngineConfig
from pop_disagg.engine.engine import LLMEngine
from pop_disagg.engine.sampling import SamplingParams
from pop_disagg.models import cpu_blas
from pop_disagg.models.loader import load_model


@pytest.fixture(autouse=True)
def _restore_backend():
    before = cpu_blas.active()
    yield
    cpu_blas.configure(before)


def test_resolve_rules(monkeypatch):
    with pytest.raises(ValueError, match="unknown CPU BLAS"):
        cpu_blas.resolve("mkl")
    assert cpu_blas.resolve("torch") == "torch"
    monkeypatch.setenv("POP_DISAGG_CPU_BLAS", "torch")  # the environment decides what "auto" means
    assert cpu_blas.resolve("auto") == "torch"
    monkeypatch.delenv("POP_DISAGG_CPU_BLAS")
    if cpu_blas.has_onednn():
        expected = "onednn"
    elif cpu_blas.numpy_has_openblas() and cpu_blas.cpu_vendor() == "AuthenticAMD":
        expected = "openblas"
    else:
        expected = "torch"
    assert cpu_blas.resolve("auto") == expected


@pytest.mark.parametrize("rows", [1, 2, 7, 64])
def test_onednn_linear_equals_torch_and_follows_in_place_edits(rows):
    g = torch.Generator().manual_seed(0)
    fused = torch.randn(rows, 96, generator=g)
    x = fused[:, 32:64]  # a strided half of a fused GEMM's output, as the MLP passes it
    weight = torch.nn.Parameter(torch.randn(40, 32, generator=g))  # (out, in), requires grad
    bias = torch.randn(40, generator=g)
    packed = cpu_blas.PackedWeight(weight.t())
    cpu_blas.configure("onednn")
    with torch.inference_mode():
        got = cpu_blas.linear(x, weight.t(), bias, packed)
        torch.testing.assert_close(got, x @ weight.t() + bias, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        weight.mul_(-2.0)  # through the parameter, as the K/V correction and tests write
    with torch.inference_mode():
        torch.testing.assert_close(cpu_blas.linear(x, weight.t(), None, packed), x @ weight.t(), atol=1e-5, rtol=1e-5)
    out = cpu_blas.linear(x, weight.t(), bias, packed)  # autograd on: torch's GEMM, differentiable
    assert out.requires_grad
    out.sum().backward()
    assert weight.grad is not None


def test_openblas_linear_equals_torch_on_strided_inputs_with_bias():
    g = torch.Generator().manual_seed(0)
    fused = torch.randn(7, 96, generator=g)
    x = fused[:, 32:64]  # a strided half of a fused GEMM's output, as the MLP passes it
    weight = torch.nn.Parameter(torch.randn(40, 32, generator=g))  # (out, in), requires grad
    bias = torch.randn(40, generator=g)
    cpu_blas.configure("torch")
    with torch.inference_mode():
        ref = cpu_blas.linear(x, weight.t(), bias)
    cpu_blas.configure("openblas")
    with torch.inference_mode():
        got = cpu_blas.linear(x, weight.t(), bias)
        one_row = cpu_blas.linear(x[:1], weight.t().contiguous())
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one_row, ref[:1] - bias, atol=1e-5, rtol=1e-5)
    # With autograd on (calibration), torch's GEMM runs and the result is differentiable.
    out = cpu_blas.linear(x, weight.t(), bias)
    assert out.requires_grad
    out.sum().backward()
    assert weight.grad is not None


def test_openblas_follows_torchs_thread_count():
    from threadpoolctl import threadpool_info

    threads = torch.get_num_threads()
    cpu_blas.configure("openblas")
    try:
        torch.set_num_threads(1)
        with torch.inference_mode():
            cpu_blas.linear(torch.ones(2, 3), torch.ones(3, 4))
        assert {i["num_threads"] for i in threadpool_info() if i["internal_api"] == "openblas"} == {1}
    finally:
        torch.set_num_threads(threads)


def test_engine_setting_picks_the_backend_and_both_agree(tiny_ckpt):
    path = tiny_ckpt("llama")
    model = load_model(path)
    prompt = [5, 9, 2, 33, 17, 8, 1, 40]
    logits = {}
    for backend in ("torch", "openblas", "onednn"):
        engine = LLMEngine(
            EngineConfig(model=path, kv_cache_memory_mb=1, block_size=4, max_num_seqs=2, cpu_blas=backend),
            model=model,
            model_path=path,
        )
        assert cpu_blas.active() == backend
        out = engine.generate([prompt], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
        assert len(out.token_ids) == 6
        with torch.inference_mode():
            ids = torch.tensor(prompt + out.token_ids[:-1])
            from pop_disagg.models.attention import PrefillAttention

            logits[backend] = model.compute_logits(model(ids, torch.arange(len(ids)), PrefillAttention([0, len(ids)])))
    for backend in logits:
        torch.testing.assert_close(logits[backend], logits["torch"], atol=1e-4, rtol=1e-4)
