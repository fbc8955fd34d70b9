"""The prefix cache on image prompts: a block that holds an image's placeholder tokens is named
with the image's content digest, and every later block inherits it through its parent.

The bars: the same image behind the same text is a hit and yields the greedy tokens (and their
logprobs) of a cold engine (caching off), colocated and through a disaggregated pair whose prefill
worker serves it from its own pool; a different image of the same size (the very same token ids)
is a miss past the text before the image, never the other image's K/V (the tiny random models
give the two images the same greedy tokens, so the logprobs, which differ between the images far
more than between a warm and a cold run, carry that bar); Gemma-3, whose images attend to
themselves both ways, reuses only a prefix that covers every image; and the digest covers the
pixels and the patch grid (Qwen-VL's positions after an image depend on it).
"""

from __future__ import annotations

import threading
import time

import torch

from pop_disagg.disagg.decode_worker import DecodeWorker, Failed, Tokens
from pop_disagg.disagg.kv_transfer import FakeTransport, KVSender
from pop_disagg.disagg.prefill_cache import PrefillCache
from pop_disagg.disagg.prefill_worker import PrefillTask, PrefillWorker
from pop_disagg.engine.engine import LLMEngine
from pop_disagg.engine.kv_cache import PrefixKey, block_hash, plan_cache_key, prefill_block_hashes
from pop_disagg.engine.sampling import SamplingParams
from pop_disagg.models.loader import load_model
from pop_disagg.models.multimodal import mrope_positions
from pop_disagg.models.vision import ProcessedImage, image_keys

from .test_vlm import _engine
from .vlm_reference import noise_image

BLOCK = 4  # test_vlm._engine's block size
MAX_NEW = 6
# Enough text before the image for whole blocks of it, and after it before the question differs.
TEXT = "A preamble shared by every user of this service, then {} and some words before the question: {}"


def _prompts(engine: LLMEngine) -> dict:
    """name -> (ids, images). ``same``: the first image again with another question; ``other``:
    another image of the same size behind the first's text (so the same token ids as ``first``)."""
    inputs, spec = engine.image_inputs, engine.vision_spec
    a, b = inputs.process(noise_image(64, 32, 1)), inputs.process(noise_image(64, 32, 2))

    def prompt(image, question):
        ids = engine.tokenizer.encode(
            inputs.expand(TEXT.format(spec.placeholder, question), [image]), add_special_tokens=False
        )
        return ids, [image]

    return {
        "first": prompt(a, "what is it?"),
        "same": prompt(a, "which colours are there?"),
        "other": prompt(b, "what is it?"),
        "again": prompt(a, "what is it?"),
    }


def _greedy():
    return SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, logprobs=1)


def _scores(logprobs) -> torch.Tensor:
    return torch.tensor([lp.logprob for lp in logprobs])


def _assert_same_answer(got, want, other, name: str) -> None:
    """(tokens, logprobs) ``got`` == ``want`` (a cold run), and nearer to it than ``other`` (the cold
    run with the other image) is: the logprobs tell the two images apart."""
    assert got[0] == want[0], name
    assert (got[1] - want[1]).abs().max() < 1e-4, name
    assert (other[1] - want[1]).abs().max() > 1e-3, name


def _common(x: list[int], y: list[int]) -> int:
    n = 0
    while n < min(len(x), len(y)) and x[n] == y[n]:
        n += 1
    return n


def _expected_hits(prompts, spec, name: str, limit) -> int:
    """Prompt tokens ``name`` finds cached after ``first``: the whole blocks of what the two share
    (up to ``limit(ids)`` positions), only the text before the image for another image, none of it
    for Gemma-3 then (its images are prefilled whole)."""
    ids, first = prompts[name][0], prompts["first"][0]
    start = ids.index(spec.image_token_id)
    shared = start if name == "other" else _common(ids, first)
    hits = min(shared, limit(ids), limit(first)) // BLOCK * BLOCK
    if spec.is_bidirectional and hits < start + prompts[name][1][0].num_tokens:
        return 0
    return hits


def _cold(path, prompts, **kw) -> dict:
    """name -> (tokens, logprobs) of an engine without a prefix cache."""
    cold = _engine(path, enable_prefix_caching=False, **kw)
    outs = {name: cold.generate([ids], _greedy(), images=[ims])[0] for name, (ids, ims) in prompts.items()}
    return {name: (o.token_ids, _scores(o.logprobs)) for name, o in outs.items()}


def _other_of(name: str) -> str:
    return "first" if name == "other" else "other"


def _warm_equals_cold(path, **kw):
    warm = _engine(path, **kw)
    spec = warm.vision_spec
    prompts = _prompts(warm)
    assert prompts["other"][0] == prompts["first"][0]  # only the digest tells them apart
    cold = _cold(path, prompts, **kw)
    for name, (ids, images) in prompts.items():
        out = warm.generate([ids], _greedy(), images=[images])[0]
        _assert_same_answer((out.token_ids, _scores(out.logprobs)), cold[name], cold[_other_of(name)], name)
        want = 0 if name == "first" else _expected_hits(prompts, spec, name, lambda p: len(p) - 1)
        assert out.num_cached_tokens == want, name
    start = prompts["first"][0].index(spec.image_token_id)
    assert start >= BLOCK  # "other" had text blocks to reuse
    assert _expected_hits(prompts, spec, "same", lambda p: len(p) - 1) > start  # "same" reused its image


def test_warm_engine_with_images_equals_cold(tiny_vlm, vlm_arch):
    _warm_equals_cold(tiny_vlm(vlm_arch))


def test_warm_engine_with_images_equals_cold_under_chunked_prefill(tiny_vlm):
    """Qwen3-VL (Gemma-3's images need one-pass prefill): chunks of 16 tokens split its image."""
    _warm_equals_cold(tiny_vlm("qwen3_vl"), enable_chunked_prefill=True, max_num_batched_tokens=16)


class _VisionSplit:
    """A prefill worker with its vision encoder and prefix cache, and a decode worker (no vision
    encoder: K/V only) with its own, over a fake link."""

    def __init__(self, path):
        self.engine = _engine(path)
        self.decode_engine = LLMEngine(self.engine.config, model=load_model(path))
        assert self.decode_engine.vision is None
        self.key = self.decode_engine.prefix_key
        self.decode = DecodeWorker(self.decode_engine, transfer_timeout_s=10)
        a, b = FakeTransport.pair()
        arch = self.engine.arch
        self.sender = KVSender(a, arch.num_layers, (arch.num_kv_heads, arch.head_dim), torch.float32, 10)
        self.decode.attach_link(0, b)
        self.cache = PrefillCache(arch, 64, BLOCK, torch.float32, torch.device("cpu"))
        self.prefill = PrefillWorker(
            load_model(path, prefill_only_plan=self.engine.plan),
            self.engine.plan,
            {0: self.sender},
            cache=self.cache,
            prefix_key=lambda p: PrefixKey(plan_cache_key(path, p), not p.skip_layers),
        )
        self.prefill.load_vision(path)
        self.num_encoded = 0  # images through the prefill worker's vision encoder
        encoder = self.prefill.vision[0]
        encode = encoder.encode

        def counted(images):
            self.num_encoded += len(images)
            return encode(images)

        encoder.encode = counted
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=w.run, args=(self.stop,), daemon=True) for w in (self.prefill, self.decode)
        ]
        for t in self.threads:
            t.start()

    def run(self, rid, ids, images, reuse: bool):
        """One request to the end -> (tokens, decode-side cached tokens, prefill-side cached tokens or None)."""
        spec = self.engine.vision_spec
        keys = image_keys(spec, ids, images)
        delta = 0
        if spec.is_qwen:
            delta = mrope_positions(ids, spec.image_token_id, [im.grid_thw for im in images], spec.merge_size)[1]
        events, outcome = [], []
        res = self.decode.reserve(
            rid,
            ids,
            _greedy(),
            0,
            events.append,
            prefix_key=self.key if reuse else None,
            remote_image_delta=delta,
            image_keys=keys,
        )
        assert res is not None
        if res.transfer_id:
            task = PrefillTask(
                rid,
                res.transfer_id,
                0,
                ids[:-1],
                outcome.append,
                send_start=res.num_cached_tokens,
                images=list(images),
                image_keys=keys,
            )
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
        tokens = [t for e in events if isinstance(e, Tokens) for t in e.token_ids]
        logprobs = _scores([lp for e in events if isinstance(e, Tokens) for lp in e.logprobs])
        return (tokens, logprobs), res.num_cached_tokens, outcome[0].num_cached_tokens if outcome else None

    def close(self):
        self.sender.close()
        self.stop.set()
        for t in self.threads:
            t.join(2)
        bm = self.decode_engine.blocks
        assert bm.num_free_blocks == bm.num_blocks and all(c == 0 for c in bm.ref_counts)
        assert all(c == 0 for c in self.cache.blocks.ref_counts)


def test_disaggregated_pair_reuses_image_prefixes_and_equals_cold(tiny_vlm, vlm_arch):
    """The decode worker's cache (``same``) and the prefill worker's own (``other``, ``again``, with
    the decode side holding nothing): tokens of the cold engine, hits only where the image matches."""
    path = tiny_vlm(vlm_arch)
    split = _VisionSplit(path)
    try:
        spec = split.engine.vision_spec
        prompts = _prompts(split.engine)
        cold = _cold(path, prompts)
        got, held, _ = split.run("first", *prompts["first"], reuse=True)
        _assert_same_answer(got, cold["first"], cold["other"], "first")
        assert held == 0
        # The decode worker holds the shared blocks (those its transferred prefix filled).
        got, held, _ = split.run("same", *prompts["same"], reuse=True)
        _assert_same_answer(got, cold["same"], cold["other"], "same")
        assert held == _expected_hits(prompts, spec, "same", lambda p: len(p) - 1) > 0
        # The prefill worker's pool (at least one prefix token left to encode): sent from there. A
        # prefix cached past the image needs no vision encoder ("again"), another image does.
        for name, num_encoded in (("other", 1), ("again", 0)):
            before = split.num_encoded
            got, held, encoded_hits = split.run(name, *prompts[name], reuse=False)
            _assert_same_answer(got, cold[name], cold[_other_of(name)], name)
            assert held == 0 and encoded_hits == _expected_hits(prompts, spec, name, lambda p: len(p) - 2), name
            assert split.num_encoded - before == num_encoded, name
        assert split.cache.num_hit_tokens > 0
    finally:
        split.close()


def test_digest_covers_pixels_and_patch_grid(tiny_vlm):
    engine = _engine(tiny_vlm("qwen3_vl"))
    inputs = engine.image_inputs
    a, a_again = inputs.process(noise_image(64, 32, 1)), inputs.process(noise_image(64, 32, 1))
    assert a.digest == a_again.digest and a is not a_again
    assert inputs.process(noise_image(64, 32, 2)).digest != a.digest
    # Same pixel bytes, transposed grid (same token count): other positions after the image.
    t, h, w = a.grid_thw
    transposed = ProcessedImage(a.pixel_values.clone(), (t, w, h), a.num_tokens)
    assert transposed.digest != a.digest
    # Blocks before the image keep the text names; the image's block and every later one change.
    prompts = _prompts(engine)
    ids, (image,) = prompts["first"]
    other = prompts["other"][1][0]
    key = engine.prefix_key
    names = prefill_block_hashes(ids, key, BLOCK, image_keys(engine.vision_spec, ids, [image]))
    other_names = prefill_block_hashes(ids, key, BLOCK, image_keys(engine.vision_spec, ids, [other]))
    first_image_block = ids.index(engine.vision_spec.image_token_id) // BLOCK
    assert (
        names[:first_image_block]
        == other_names[:first_image_block]
        == prefill_block_hashes(ids, key, BLOCK)[:first_image_block]
    )
    assert all(x != y for x, y in zip(names[first_image_block:], other_names[first_image_block:]))
    assert names[0] == block_hash(b"", ids[:BLOCK], key.block(BLOCK))
