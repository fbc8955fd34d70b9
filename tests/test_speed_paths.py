"""The engine's fast paths equal the plain ones: fused q/k/v and gate/up GEMMs, bucketed (padded)
decode steps as CUDA graphs / torch.compile run them, and (GPU only, not run in CI) CUDA graphs."""

from __future__ import annotations

import pytest
import torch

from pop_disagg.config import EngineConfig
from pop_disagg.engine.compiled_decode import BucketedDecode, batch_buckets
from pop_disagg.engine.engine import LLMEngine
from pop_disagg.engine.sampling import SamplingParams
from pop_disagg.models.attention import PrefillAttention
from pop_disagg.models.loader import load_model


def _unfused_logits(model, ids):
    """The same forward with every fusion bypassed (hooks force each projection's own call)."""
    hooks = [
        m.register_forward_hook(lambda *a: None)
        for n, m in model.named_modules()
        if n.endswith(("q_proj", "gate_proj"))
    ]
    try:
        return model.compute_logits(model(ids, torch.arange(len(ids)), PrefillAttention([0, len(ids)])))
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v biases fused too
def test_fused_weights_keep_hf_names_and_follow_edits(tiny_ckpt, family):
    model = load_model(tiny_ckpt(family))
    ids = torch.tensor([3, 17, 5, 9, 30, 2])
    attn = model.model.layers[1].self_attn
    params = dict(model.named_parameters())
    assert "model.layers.1.self_attn.k_proj.weight" in params and "model.layers.1.mlp.up_proj.weight" in params
    assert not any("qkv" in n or "gate_up" in n for n in params)  # no new names in the state dict
    # The HF-named weights are views of the fused GEMM's weight.
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.qkv.weight_t.untyped_storage().data_ptr()
    with torch.inference_mode():
        fused = model.compute_logits(model(ids, torch.arange(6), PrefillAttention([0, 6])))
        torch.testing.assert_close(fused, _unfused_logits(model, ids), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # an in-place edit under the old name reaches the fused GEMM
        attn.v_proj.weight.mul_(-2.0)
        model.model.layers[0].mlp.up_proj.weight.add_(0.05)
    with torch.inference_mode():
        edited = model.compute_logits(model(ids, torch.arange(6), PrefillAttention([0, 6])))
        assert not torch.allclose(edited, fused, atol=1e-3)
        torch.testing.assert_close(edited, _unfused_logits(model, ids), atol=1e-5, rtol=1e-5)
    # .to() replaces the storage: the model fuses again and still computes the same function.
    model = model.to(torch.float64)
    assert (
        model.model.layers[1].self_attn.qkv.weight_t.dtype == torch.float64
        and model.model.layers[1].self_attn.qkv.is_current()
    )
    with torch.inference_mode():
        torch.testing.assert_close(
            model.compute_logits(model(ids, torch.arange(6), PrefillAttention([0, 6]))).float(),
            edited,
            atol=1e-4,
            rtol=1e-4,
        )


def test_forward_hook_on_a_projection_still_fires(tiny_ckpt):
    """K/V correction captures k_proj outputs with hooks: a hooked projection is called itself."""
    model = load_model(tiny_ckpt("llama"))
    seen = []
    h = model.model.layers[2].self_attn.k_proj.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    with torch.inference_mode():
        model(torch.arange(5), torch.arange(5), PrefillAttention([0, 5]))
    h.remove()
    assert seen == [torch.Size([5, model.arch.kv_size])]


def test_batch_and_context_buckets():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(3) == [1, 2, 3]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    dec = BucketedDecode.__new__(BucketedDecode)
    dec.buckets = batch_buckets(64)
    dec.kv_cache = type("C", (), {"block_size": 16})()
    assert dec.bucket(5, 17) == (8, 32) and dec.bucket(16, 16) == (16, 16) and dec.bucket(17, 65) == (24, 128)


def _engine(path, model, **kw):
    cfg = EngineConfig(model=path, kv_cache_memory_mb=1, block_size=4, max_num_seqs=3, **kw)
    return LLMEngine(cfg, model=model, model_path=path)


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: sliding-window masks in the padded step
def test_padded_bucketed_decode_equals_eager(tiny_ckpt, family):
    """The static-shape step CUDA graphs and torch.compile run (batch and context padded to a
    bucket, padding rows repeating the last request) gives the eager engine's tokens."""
    path = tiny_ckpt(family)
    model = load_model(path)
    prompts = [[5, 9, 13, 40, 41, 42, 7, 8, 9, 10], [11, 12], [3, 4, 5, 6, 7]]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (14, 9, 12)]  # the batch shrinks 3 -> 2 -> 1
    eager = [o.token_ids for o in _engine(path, model, enforce_eager=True).generate(prompts, params)]
    padded = _engine(path, model)
    padded.runner.bucketed = BucketedDecode(model, padded.kv_cache, 3, "padded")
    calls = []
    real = padded.runner.bucketed._forward
    padded.runner.bucketed._forward = lambda *a: calls.append(tuple(a[0].shape) + tuple(a[3].shape)) or real(*a)
    assert [o.token_ids for o in padded.generate(prompts, params)] == eager
    assert calls and all(b in (1, 2, 3) and s & (s - 1) == 0 for b, _, s in calls)  # bucketed shapes only
    assert padded.blocks.num_free_blocks == padded.blocks.num_blocks


def test_enforce_eager_and_cpu_default(tiny_ckpt):
    path = tiny_ckpt("llama")
    model = load_model(path)
    assert _engine(path, model).runner.bucketed is None  # CPU: eager unless compile is asked for
    assert not EngineConfig(device="cuda", enforce_eager=True).use_compiled_decode
    assert EngineConfig(device="cuda").use_compiled_decode


def test_cpu_compile_only_takes_the_batch_sizes_it_was_measured_to_speed_up(tiny_ckpt):
    """CPU torch.compile paid only at batch 1 (benchmarks/results/decode/README.md); bigger steps stay eager,
    while CUDA graphs and the padded test mode take every batch size."""
    from pop_disagg.engine.compiled_decode import CPU_COMPILE_MAX_BATCH

    path = tiny_ckpt("llama")
    runner = _engine(path, load_model(path)).runner
    compiled = BucketedDecode(
        runner.model, runner.kv_cache, 8, "compile"
    )  # torch.compile is lazy: nothing compiles here
    assert compiled.handles(CPU_COMPILE_MAX_BATCH) and not compiled.handles(CPU_COMPILE_MAX_BATCH + 1)
    assert all(BucketedDecode(runner.model, runner.kv_cache, 8, mode).handles(8) for mode in ("cuda_graph", "padded"))


@pytest.mark.gpu
def test_cuda_graph_decode_equals_eager_on_gpu(tiny_ckpt):
    """Not run in CI (no GPU): greedy tokens with CUDA-graph decode == eager decode."""
    path = tiny_ckpt("llama")
    model = load_model(path, device="cuda")
    prompts = [[5, 9, 13, 40], [11, 12], [3, 4, 5, 6, 7, 8]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    cfg = dict(model=path, device="cuda", kv_cache_memory_mb=1, block_size=4, max_num_seqs=3)
    eager = LLMEngine(EngineConfig(enforce_eager=True, **cfg), model=model, model_path=path).generate(prompts, params)
    graphed_engine = LLMEngine(EngineConfig(**cfg), model=model, model_path=path)
    assert graphed_engine.runner.bucketed.mode == "cuda_graph"
    graphed = graphed_engine.generate(prompts, params)
    assert [o.token_ids for o in graphed] == [o.token_ids for o in eager]
    assert graphed_engine.runner.bucketed._graphs  # at least one graph was captured and replayed


def test_streamed_skipped_run_kv_equals_one_gemm(tiny_ckpt):
    """The prefill worker's layer-by-layer projection of a skipped run == the one-GEMM projection."""
    from pop_disagg.pop.plan import PrunePlan

    model = load_model(tiny_ckpt("qwen2"))  # K/V biases
    plan = PrunePlan.default(model.arch.num_layers)
    ids, pos = torch.tensor([3, 17, 5, 9, 30, 2, 8]), torch.arange(7)
    got = {}
    for stream in (False, True):
        stored = []
        with torch.inference_mode():
            model(
                ids,
                pos,
                PrefillAttention(
                    [0, 4, 7], sink=lambda l, k, v: stored.append((l, k.clone(), v.clone())), stream_kv=stream
                ),
                plan=plan,
            )
        got[stream] = stored
    assert [l for l, _, _ in got[True]] == [l for l, _, _ in got[False]] == list(range(model.arch.num_layers))
    for (_, k1, v1), (_, k2, v2) in zip(got[False], got[True]):
        torch.testing.assert_close(k2, k1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v2, v1, atol=1e-5, rtol=1e-5)


def test_lean_decode_ops_are_bitwise_the_reference_formulas():
    """The decode step's trimmed ops (fewer calls per layer) compute bit for bit what the textbook
    formulas do, so nothing downstream (parity with Transformers, greedy tokens) can move."""
    import torch.nn.functional as F

    from pop_disagg.models.arch import RopeSpec
    from pop_disagg.models.attention import PagedAttention
    from pop_disagg.models.layers import RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq

    g = torch.Generator().manual_seed(0)
    for gemma in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            for dim, rows in ((64, 1), (576, 7), (4096, 3)):
                norm = RMSNorm(dim, 1e-6, gemma)
                norm.weight.data = torch.randn(dim, generator=g).to(dtype)
                x = (torch.randn(rows, dim, generator=g) * 3).to(dtype)
                xf = x.float()
                ref_n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
                ref = (ref_n * (1.0 + norm.weight.float())).type_as(x) if gemma else norm.weight * ref_n.to(dtype)
                with torch.inference_mode():
                    assert torch.equal(norm(x), ref) and torch.equal(norm.normalize(x), ref_n)
                assert torch.equal(norm(x), ref)  # the differentiable path (calibration) too

    spec = RopeSpec(theta=10000.0)
    pos = torch.tensor([0, 5, 77, 1000])
    cos, sin_signed = rope_cos_sin(rope_inv_freq(spec, 64), pos, torch.float32)
    freqs = pos.float()[:, None] * rope_inv_freq(spec, 64)[None, :]
    emb = torch.cat((freqs, freqs), -1)[:, None, :]
    x = torch.randn(4, 12, 64, generator=g)
    rotate_half = torch.cat((-x[..., 32:], x[..., :32]), -1)
    assert torch.equal(apply_rope(x, cos, sin_signed), x * emb.cos() + rotate_half * emb.sin())

    # Additive float masks made once per step (or none when nothing is masked) == SDPA's boolean one.
    cache_k = torch.randn(2, 3, 8, 4, 16, generator=g)  # (L, Hkv, num_blocks, block_size, D)
    cache_v = torch.randn(2, 3, 8, 4, 16, generator=g)
    for lens, window, dense in (([13], None, True), ([13], 8, True), ([13, 5, 9], None, False), ([13, 5, 9], 4, False)):
        s = max(lens)
        table = torch.stack([torch.randperm(32, generator=g)[:s] for _ in lens])
        ctx = torch.tensor(lens)
        attn = PagedAttention(cache_k, cache_v, table[:, 0], table, ctx, dense=dense)
        q = torch.randn(len(lens), 9, 16, generator=g)
        keys, vals = attn._gather(1)
        key_pos, query_pos = torch.arange(s)[None, :], (ctx - 1)[:, None]
        visible = key_pos <= query_pos
        if window is not None:
            visible &= key_pos > query_pos - window
        ref = F.scaled_dot_product_attention(
            q[:, :, None], keys, vals, attn_mask=visible[:, None, None], scale=0.25, enable_gqa=True
        )[:, :, 0]
        # The CPU decode path is three calls (GEMM, softmax, GEMM), not SDPA's kernel: equal up to
        # float32 rounding of the different summation order.
        torch.testing.assert_close(attn.attend(1, q, None, None, window, 0.25), ref, atol=1e-6, rtol=1e-5)
        assert (attn._mask(1, window, q.dtype) is None) == (dense and (window is None or s <= window))


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("backend", ["torch", "openblas", "onednn"])
def test_logits_take_the_head_copy_where_its_layout_is_faster(tiny_ckpt, backend, rows):
    """A (hidden, vocab) copy of the LM head serves torch's MKL at one row (faster over it than over
    the checkpoint layout, slower from 4 rows up) and OpenBLAS at every row count; oneDNN reads its
    own packed copy at every row count. Logits agree either way and follow an in-place edit of the
    (tied) weight."""
    import torch.nn.functional as F

    from pop_disagg.models import cpu_blas

    before = cpu_blas.active()
    cpu_blas.configure(backend)
    try:
        model = load_model(tiny_ckpt("llama"))
        h = torch.randn(rows, model.arch.hidden_size)
        weight = model.lm_head.weight if model.lm_head is not None else model.model.embed_tokens.weight
        with torch.inference_mode():
            torch.testing.assert_close(
                model.compute_logits(h), F.linear(model.model.norm(h), weight).float(), atol=1e-5, rtol=1e-5
            )
            uses_copy = backend == "openblas" if rows > 1 else backend in ("torch", "openblas")
            assert (model._head_t is not None) == uses_copy
        with torch.no_grad():
            weight.mul_(-1.5)
        with torch.inference_mode():
            torch.testing.assert_close(
                model.compute_logits(h), F.linear(model.model.norm(h), weight).float(), atol=1e-5, rtol=1e-5
            )
    finally:
        cpu_blas.configure(before)


@pytest.mark.gpu
def test_fused_cuda_rms_norm_is_the_reference_formula_on_gpu():
    """Not run in CI (no GPU): the one-kernel norm of inference on CUDA == the op-by-op reference
    (the path autograd takes), to bfloat16 rounding."""
    from pop_disagg.models.layers import RMSNorm

    g = torch.Generator(device="cuda").manual_seed(0)
    for gemma in (False, True):
        for dtype in (torch.bfloat16, torch.float32):
            norm = RMSNorm(576, 1e-5, gemma).cuda()
            norm.weight.data = torch.randn(576, generator=g, device="cuda").to(dtype)
            x = (torch.randn(7, 576, generator=g, device="cuda") * 3).to(dtype)
            ref = norm(x)  # grad mode: the reference ops
            with torch.inference_mode():
                got = norm(x)
            tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


def test_one_sequence_chunk_attention_lower_right_causal_equals_the_mask():
    """The GPU's mask-free path for a one-sequence prompt chunk (causal aligned at the lower right)
    attends exactly as the explicit (M, S) mask does; forced on here, since CPU keeps the mask."""
    from torch.nn.attention.bias import causal_lower_right

    from pop_disagg.models.attention import ExtendAttention

    g = torch.Generator().manual_seed(0)
    layers, blocks, bs, hkv, heads, d = 2, 6, 4, 2, 4, 8
    k_cache, v_cache = (torch.randn(layers, hkv, blocks, bs, d, generator=g) for _ in range(2))  # head-major
    for s, m in ((21, 6), (8, 8), (13, 1)):  # a later chunk, a first chunk, a one-token chunk
        slot_table = torch.randperm(blocks * bs, generator=g)[:s][None]
        attn = ExtendAttention(
            k_cache, v_cache, slot_table[0, s - m :], slot_table, torch.tensor([s]), cu_seqlens=[0, m]
        )
        assert attn._lower_right is None  # a CPU tensor: the mask path
        q = torch.randn(m, heads, d, generator=g)
        with torch.inference_mode():
            want = attn.attend(1, q, None, None, None, 0.3)
            attn._lower_right = causal_lower_right(m, s)
            got = attn.attend(1, q, None, None, None, 0.3)
            attn._lower_right = None
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "n, s, heads, kv_heads",
    [(1, 1, 4, 4), (127, 127, 9, 3), (128, 128, 6, 2), (300, 300, 9, 3), (129, 400, 8, 2), (1, 77, 6, 3)],
)
def test_causal_blocks_equal_sdpa_with_the_causal_mask(n, s, heads, kv_heads):
    """The CPU prefill attention built from oneDNN GEMMs over query blocks (``causal_blocks``) is
    causal grouped-query attention: SDPA's result with the explicit mask, for prompts shorter than,
    equal to and longer than a block, and for chunks whose earlier positions come first (s > n)."""
    import torch.nn.functional as F

    from pop_disagg.models import cpu_blas
    from pop_disagg.models.attention import _causal_mask, causal_blocks, takes_causal_blocks

    if not cpu_blas.has_onednn():
        pytest.skip("torch built without oneDNN: causal_blocks is not taken on this machine")
    before = cpu_blas.active()
    cpu_blas.configure("onednn")
    try:
        g = torch.Generator().manual_seed(n + s)
        q = torch.randn(n, heads, 16, generator=g)
        k, v = (torch.randn(s, kv_heads, 16, generator=g) for _ in range(2))
        with torch.inference_mode():
            assert takes_causal_blocks(q, s, None) and not takes_causal_blocks(q, s, s - 1)
            got = causal_blocks(q, k.transpose(0, 1), v.transpose(0, 1), 0.3)
            want = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None],
                k.transpose(0, 1)[None],
                v.transpose(0, 1)[None],
                attn_mask=_causal_mask(s, n, None, "cpu"),
                scale=0.3,
                enable_gqa=True,
            )[0].transpose(0, 1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert not takes_causal_blocks(q, s, None)  # autograd on (calibration): SDPA
    finally:
        cpu_blas.configure(before)


def test_prefill_in_groups_equals_one_forward(tiny_ckpt):
    """A prefill batch split into several forwards (``ModelRunner.prefill_group_tokens``) writes the
    same K/V and gives the same tokens as one forward over every prompt."""
    path = tiny_ckpt("llama")
    prompts = [[3, 17, 5, 9, 30, 2, 11], [4, 8, 15, 16, 23, 42], [7] * 13, [2, 5]]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    runs = []
    for group_tokens in (1 << 30, 8):
        engine = LLMEngine(EngineConfig(model=path, kv_cache_memory_mb=4, block_size=4, enable_prefix_caching=False))
        engine.runner.prefill_group_tokens = group_tokens
        calls = []
        forward = engine.runner._prefill_group
        engine.runner._prefill_group = lambda reqs, n: calls.append(len(reqs)) or forward(reqs, n)
        runs.append(([o.token_ids for o in engine.generate(prompts, params)], calls, engine.kv_cache.k.clone()))
    (one_tokens, one_calls, one_k), (grouped_tokens, grouped_calls, grouped_k) = runs
    assert one_calls == [4] and grouped_calls == [1, 1, 1, 1]  # 7, 6, 13 (alone, over 8), 2 tokens
    assert grouped_tokens == one_tokens
    torch.testing.assert_close(grouped_k, one_k, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3_vl"])
def test_warm_up_packs_every_weight_and_changes_nothing(tiny_ckpt, tiny_vlm, family):
    """``LLMEngine.warm_up`` (run by the serving workers before they take requests) makes oneDNN's
    packed copy of every GEMM weight, the POP plan's fused K/V ones included, without taking a KV
    block; the tokens afterwards are a cold engine's."""
    from pop_disagg.config import PruneConfig
    from pop_disagg.models import cpu_blas
    from pop_disagg.models.layers import FusedLinear

    path = tiny_vlm(family) if family == "qwen3_vl" else tiny_ckpt(family)
    config = EngineConfig(model=path, kv_cache_memory_mb=4, block_size=4, prune=PruneConfig(skip_layers=[1]))
    prompts, params = [[3, 17, 5, 9, 30, 2, 11]], SamplingParams(max_new_tokens=5, ignore_eos=True)
    cold = [o.token_ids for o in LLMEngine(config).generate(prompts, params)]
    engine = LLMEngine(config)
    engine.warm_up()
    if cpu_blas.active() == "onednn":
        fused = [v for m in engine.model.modules() for v in vars(m).values() if isinstance(v, FusedLinear)]
        assert fused and all(f.packed._packed is not None for f in fused)
        assert engine.model._fused  # the plan's skipped run, with its fused K/V projection packed
        assert all(packed[0]._packed is not None for _, _, _, packed in engine.model._fused.values())
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert [o.token_ids for o in engine.generate(prompts, params)] == cold
