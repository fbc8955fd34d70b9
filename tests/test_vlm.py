"""Vision-language models (Qwen3-VL, Gemma-3 with vision) against Transformers' own forward, and
POP on image prompts against the independent reference of ``vlm_reference.py``."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from pop_disagg.config import EngineConfig, PruneConfig
from pop_disagg.engine.engine import LLMEngine
from pop_disagg.engine.sampling import SamplingParams
from pop_disagg.limits import InvalidRequest
from pop_disagg.models.arch import ModelArch, ModelConfigError
from pop_disagg.models.attention import PrefillAttention
from pop_disagg.models.loader import load_model
from pop_disagg.models.multimodal import ImageBlockPrefillAttention, VisionRows
from pop_disagg.pop.plan import PrunePlan

from .vlm_reference import hf_inputs, hf_vlm_pop_generate, hf_vlm_pop_prefill, noise_image

# (height, width) per image: non-square grids (Qwen's height and width positions differ), and a
# Gemma image (16 tokens) wider than its sliding window (8).
SIZES = {"one": [(40, 70)], "two": [(64, 32), (48, 48)]}


def _hf(path):
    classes = {"qwen3_vl": tf.Qwen3VLForConditionalGeneration, "qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration}
    cls = next((c for name, c in classes.items() if name in str(path)), tf.Gemma3ForConditionalGeneration)
    model = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None
    return model


def _engine(path, **kw) -> LLMEngine:
    prune = kw.pop("prune", {})
    cfg = EngineConfig(model=path, prune=PruneConfig(**prune), kv_cache_memory_mb=8, block_size=4, **kw)
    return LLMEngine(cfg, model=load_model(path), model_path=path)


def _prompt(engine: LLMEngine, sizes, seed: int = 0, text: str = "Look: {} and what is it?"):
    """-> (prompt ids, processed images) for a chat-free prompt with one placeholder per image."""
    inputs, spec = engine.image_inputs, engine.vision_spec
    images = [inputs.process(noise_image(h, w, seed + i)) for i, (h, w) in enumerate(sizes)]
    body = " then ".join([spec.placeholder] * len(images))
    ids = engine.tokenizer.encode(inputs.expand(text.format(body), images), add_special_tokens=False)
    return ids, images


def _forward(engine: LLMEngine, ids, images, plan=None, n=None, sink=None, use_images=True, mrope=True):
    """Our decoder over the first ``n`` prompt tokens (all by default) in one prefill pass."""
    n = n or len(ids)
    model = engine.model
    pi = engine.encode_images(ids, images)
    vision = VisionRows.gather([(pi, 0, n, 0)]) if use_images else None
    pos = pi.rope_positions(0, n) if (pi.mrope is not None and mrope) else torch.arange(n)
    if engine.vision_spec.is_bidirectional and use_images:
        attn = ImageBlockPrefillAttention([0, n], sink=sink, spans=[pi.spans])
    else:
        attn = PrefillAttention([0, n], sink=sink)
    with torch.no_grad():
        return model(torch.tensor(ids[:n]), pos, attn, plan=plan, vision=vision)


def test_arch_reads_the_language_model_of_a_vision_checkpoint(tiny_vlm, vlm_arch):
    arch = ModelArch.from_pretrained(tiny_vlm(vlm_arch))
    if vlm_arch == "qwen3_vl":
        assert (arch.family, arch.vision_family, arch.mrope_section) == ("qwen3", "qwen3_vl", (6, 5, 5))
        assert arch.num_deepstack_layers == 2 and arch.head_dim == 32 and arch.is_mrope_interleaved
    elif vlm_arch == "qwen2_5_vl":
        assert (arch.family, arch.vision_family, arch.mrope_section) == ("qwen2", "qwen2_5_vl", (4, 6, 6))
        assert arch.num_deepstack_layers == 0 and arch.head_dim == 32 and not arch.is_mrope_interleaved
        assert arch.qkv_bias
    else:
        assert (arch.family, arch.vision_family, arch.mrope_section) == ("gemma3", "gemma3", None)
        assert "sliding" in arch.layer_types and arch.sliding_window == 8


def test_qwen2_5_vl_config_as_published_reads_the_same(tiny_vlm):
    """Published Qwen2.5-VL configs keep the language model's fields at the top level and name the
    multimodal RoPE ``{"type": "mrope"}``; they read as the nested config Transformers 5 saves."""
    import json
    from pathlib import Path

    raw = json.loads((Path(tiny_vlm("qwen2_5_vl")) / "config.json").read_text())
    text = dict(raw.pop("text_config"))
    rope = text.pop("rope_parameters")
    flat = {**raw, **text, "rope_theta": rope["rope_theta"]}
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    assert ModelArch.from_hf_dict(flat) == ModelArch.from_hf_dict(
        {**raw, "text_config": {**text, "rope_parameters": rope}}
    )
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": [4, 6, 5]}
    with pytest.raises(ModelConfigError, match="mrope_section"):
        ModelArch.from_hf_dict(flat)


@pytest.mark.parametrize("images", ["one", "two"])
def test_logits_over_text_and_images_match_transformers(tiny_vlm, vlm_arch, images):
    path = tiny_vlm(vlm_arch)
    engine, ref = _engine(path), _hf(path)
    ids, processed = _prompt(engine, SIZES[images])
    with torch.no_grad():
        expected = ref(**hf_inputs(ref, ids, processed)).logits[0]
    got = engine.model.compute_logits(_forward(engine, ids, processed))
    assert (expected - got).abs().max().item() < 1e-4
    # The comparison sees the image path: without the features (or, for Qwen3-VL, without the
    # multimodal positions; for Gemma-3, without an image seeing itself both ways) it fails.
    no_images = engine.model.compute_logits(_forward(engine, ids, processed, use_images=False))
    assert (expected - no_images).abs().max().item() > 1e-3
    if vlm_arch != "gemma3_vision":
        flat = engine.model.compute_logits(_forward(engine, ids, processed, mrope=False))
        assert (expected - flat).abs().max().item() > 1e-3
    else:
        pi = engine.encode_images(ids, processed)
        causal = PrefillAttention([0, len(ids)])
        with torch.no_grad():
            h = engine.model(
                torch.tensor(ids), torch.arange(len(ids)), causal, vision=VisionRows.gather([(pi, 0, len(ids), 0)])
            )
        assert (expected - engine.model.compute_logits(h)).abs().max().item() > 1e-3


def test_greedy_generation_with_images_matches_transformers(tiny_vlm, vlm_arch):
    """Nothing skipped: the engine's greedy tokens over image prompts == Transformers' ``generate``."""
    path = tiny_vlm(vlm_arch)
    engine, ref = _engine(path, prune={"no_prune": True}), _hf(path)
    prompts = [_prompt(engine, SIZES["one"], seed=1), _prompt(engine, SIZES["two"], seed=2)]
    text_only = engine.tokenizer.encode("Hello, world! How are you", add_special_tokens=False)
    outs = engine.generate(
        [p for p, _ in prompts] + [text_only],
        SamplingParams(max_new_tokens=10, ignore_eos=True),
        images=[im for _, im in prompts] + [None],
    )
    for (ids, images), out in zip(prompts, outs):
        expected = ref.generate(**hf_inputs(ref, ids, images), max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert out.token_ids == expected[0, len(ids) :].tolist()
    expected = ref.generate(torch.tensor([text_only]), max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert outs[-1].token_ids == expected[0, len(text_only) :].tolist()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.mark.parametrize("plan_name", ["default", "every_third", "first_third"])
def test_skipped_layer_kv_on_image_prompts_equal_transformers_reference(tiny_vlm, vlm_arch, plan_name):
    """POP prefill over x_1..x_{N-1} of an image prompt: every layer's K/V (skipped layers through
    the fused projection) == the reference from Transformers' modules on the pruned hidden state.
    ``first_third`` skips Qwen3-VL's DeepStack layers: their features still land after each."""
    path = tiny_vlm(vlm_arch)
    engine, ref = _engine(path), _hf(path)
    plan = getattr(PrunePlan, plan_name)(engine.arch.num_layers)
    ids, images = _prompt(engine, SIZES["two"], seed=3)
    got = {}
    _forward(engine, ids, images, plan=plan, n=len(ids) - 1, sink=lambda l, k, v: got.__setitem__(l, (k, v)))
    expected = hf_vlm_pop_prefill(ref, hf_inputs(ref, ids, images), set(plan.skip_layers))
    assert sorted(got) == list(range(engine.arch.num_layers))
    for l, (k_ref, v_ref) in enumerate(expected):
        k, v = got[l]
        assert (k - k_ref[0].transpose(0, 1)).abs().max().item() < 1e-4, f"layer {l} K"
        assert (v - v_ref[0].transpose(0, 1)).abs().max().item() < 1e-4, f"layer {l} V"


@pytest.mark.parametrize("chunked", [False, True])
def test_pop_engine_on_image_prompts_equals_reference(tiny_vlm, vlm_arch, chunked):
    """The engine under the default plan (image rows skip the last third in prefill, the boundary
    token runs the full model) == reference POP generation, batched with a text-only prompt; with
    chunked prefill (Qwen3-VL: chunks split its images) the same tokens."""
    path = tiny_vlm(vlm_arch)
    kw = {"enable_chunked_prefill": True, "max_num_batched_tokens": 16} if chunked else {}
    engine, ref = _engine(path, **kw), _hf(path)
    prompts = [_prompt(engine, SIZES["two"], seed=4), _prompt(engine, SIZES["one"], seed=5)]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    if chunked and engine.vision_spec.is_bidirectional:
        with pytest.raises(InvalidRequest, match="images: .*one-pass prefill"):
            engine.add_request(prompts[0][0], params, images=prompts[0][1])
        return
    text_only = engine.tokenizer.encode("Keys and values move from the prefill worker", add_special_tokens=False)
    outs = engine.generate([p for p, _ in prompts] + [text_only], params, images=[im for _, im in prompts] + [None])
    skip = set(engine.plan.skip_layers)
    assert skip
    for (ids, images), out in zip(prompts, outs):
        assert out.token_ids == hf_vlm_pop_generate(ref, hf_inputs(ref, ids, images), skip, 8)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_image_prompt_rules(tiny_vlm, tiny_ckpt):
    engine = _engine(tiny_vlm("qwen3_vl"))
    ids, images = _prompt(engine, SIZES["two"])
    params = SamplingParams(max_new_tokens=4)
    with pytest.raises(InvalidRequest, match=r"images: the prompt's image token runs \[8, 9\] do not match"):
        engine.add_request(ids, params, images=images[:1] * 2)
    with pytest.raises(InvalidRequest, match="images: the prompt has image placeholder tokens but no images"):
        engine.add_request(ids, params)
    cut = ids[: ids.index(engine.vision_spec.image_token_id) + images[0].num_tokens]
    with pytest.raises(InvalidRequest, match="images: the prompt may not end inside an image"):
        engine.add_request(cut, params, images=images[:1])
    text = _engine(tiny_ckpt("qwen3"))
    with pytest.raises(InvalidRequest, match="images: the served model takes no images"):
        text.add_request([5, 6, 7], params, images=images[:1])


def _disaggregated_pair(path, engine: LLMEngine):
    """An in-process prefill worker (with its vision encoder) and decode worker on a fake link."""
    from pop_disagg.disagg.decode_worker import DecodeWorker
    from pop_disagg.disagg.kv_transfer import FakeTransport, KVSender
    from pop_disagg.disagg.prefill_worker import PrefillWorker

    decode = DecodeWorker(engine, transfer_timeout_s=10)
    a, b = FakeTransport.pair()
    arch = engine.arch
    sender = KVSender(a, arch.num_layers, (arch.num_kv_heads, arch.head_dim), torch.float32, 10)
    decode.attach_link(0, b)
    prefill = PrefillWorker(load_model(path, prefill_only_plan=engine.plan), engine.plan, {0: sender})
    prefill.load_vision(path)
    return prefill, decode, sender


def _serve_disaggregated(path, decode_engine: LLMEngine, prompts, max_new: int) -> dict:
    """Each (ids, images, mrope delta) through the pair; -> request id -> its events."""
    import threading
    import time

    from pop_disagg.disagg.decode_worker import Failed, Tokens
    from pop_disagg.disagg.prefill_worker import PrefillTask

    prefill, decode, sender = _disaggregated_pair(path, decode_engine)
    stop = threading.Event()
    threads = [threading.Thread(target=w.run, args=(stop,), daemon=True) for w in (prefill, decode)]
    for t in threads:
        t.start()
    events = {f"r{i}": [] for i in range(len(prompts))}
    try:
        for i, (ids, images, delta) in enumerate(prompts):
            rid = f"r{i}"
            params = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
            res = decode.reserve(rid, ids, params, 0, events[rid].append, remote_image_delta=delta)
            assert res is not None
            tid = res.transfer_id
            prefill.submit(PrefillTask(rid, tid, 0, ids[:-1], lambda o: None, images=list(images or [])))
        deadline = time.monotonic() + 60
        while not all(
            any(isinstance(e, (Tokens, Failed)) and getattr(e, "is_finished", True) for e in v) for v in events.values()
        ):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        sender.close()
        stop.set()
        for t in threads:
            t.join(2)
    return events


def test_disaggregated_pair_with_images_equals_engine(tiny_vlm, vlm_arch):
    """The prefill worker encodes the images and prunes their rows; the decode worker, which never
    sees pixels or features (only K/V and the position offset), streams the engine's tokens."""
    from pop_disagg.disagg.decode_worker import Tokens
    from pop_disagg.models.multimodal import mrope_positions

    path = tiny_vlm(vlm_arch)
    engine = _engine(path)
    prompts = [_prompt(engine, SIZES["two"], seed=8), _prompt(engine, SIZES["one"], seed=9)]
    text_only = engine.tokenizer.encode("Hello, world! How are you", add_special_tokens=False)
    expected = engine.generate(
        [p for p, _ in prompts] + [text_only],
        SamplingParams(max_new_tokens=6, ignore_eos=True),
        images=[im for _, im in prompts] + [None],
    )
    spec = engine.vision_spec

    def delta(ids, images):
        if not spec.is_qwen:
            return 0
        return mrope_positions(ids, spec.image_token_id, [im.grid_thw for im in images], spec.merge_size)[1]

    work = [(ids, ims, delta(ids, ims)) for ids, ims in prompts] + [(text_only, None, None)]
    if spec.is_qwen:
        assert all(d != 0 for _, _, d in work[:2])  # the offset matters: the test would be vacuous
    decode_engine = LLMEngine(engine.config, model=load_model(path))  # no vision encoder: K/V only
    assert decode_engine.vision is None
    events = _serve_disaggregated(path, decode_engine, work, 6)
    for i, out in enumerate(expected):
        got = [t for e in events[f"r{i}"] if isinstance(e, Tokens) for t in e.token_ids]
        assert got == out.token_ids, f"request {i}"
    assert decode_engine.blocks.num_free_blocks == decode_engine.blocks.num_blocks


def test_image_request_preempted_on_the_decode_worker_fails_clearly(tiny_vlm):
    """Its images never reach the decode worker, so it cannot be re-prefilled there: it ends with a
    clear failure (never tokens computed without its images), the others finish, nothing leaks."""
    from pop_disagg.disagg.decode_worker import Failed, Tokens
    from pop_disagg.models.multimodal import mrope_positions

    path = tiny_vlm("qwen3_vl")
    engine = _engine(path)
    spec = engine.vision_spec
    prompts = [_prompt(engine, SIZES["one"], seed=20 + i) for i in range(3)]
    expected = engine.generate(
        [p for p, _ in prompts], SamplingParams(max_new_tokens=20, ignore_eos=True), images=[im for _, im in prompts]
    )
    work = [
        (ids, ims, mrope_positions(ids, spec.image_token_id, [im.grid_thw for im in ims], spec.merge_size)[1])
        for ids, ims in prompts
    ]
    block = engine.config.block_size
    need = -(-len(work[0][0]) // block)  # blocks of one prompt
    mb = (3 * need + 2) * engine.arch.kv_bytes_per_token(4) * block / 2**20  # all prompts, little room to decode
    decode_engine = LLMEngine(engine.config.model_copy(update={"kv_cache_memory_mb": mb}), model=load_model(path))
    events = _serve_disaggregated(path, decode_engine, work, 20)
    failed = [rid for rid, evs in events.items() if any(isinstance(e, Failed) for e in evs)]
    assert failed, "no request was preempted: the test would be vacuous"
    for i, out in enumerate(expected):
        evs = events[f"r{i}"]
        if f"r{i}" in failed:
            assert any(isinstance(e, Failed) and "images were encoded on the prefill worker" in e.message for e in evs)
        else:
            assert [t for e in evs if isinstance(e, Tokens) for t in e.token_ids] == out.token_ids
    assert decode_engine.blocks.num_free_blocks == decode_engine.blocks.num_blocks
