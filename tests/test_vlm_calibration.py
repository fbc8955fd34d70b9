"""Calibration on image prompts: the gated pass with images is POP's computation (prefill gates at
0 == the engine's pruned prefill of the image prompt), and ``pop-disagg calibrate`` takes a JSONL of
chat messages with data-URL images."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch

from pop_disagg.calib.data import encode_image_prompt, read_prompts
from pop_disagg.calib.gates import response_logits, unit_gates
from pop_disagg.calib.importance import ImportanceProfile
from pop_disagg.cli import main
from pop_disagg.config import EngineConfig, PruneConfig
from pop_disagg.engine.engine import LLMEngine
from pop_disagg.engine.sampling import SamplingParams
from pop_disagg.models.loader import load_model

from .vlm_reference import noise_image


def _image_prompt(engine: LLMEngine, sizes, seed: int):
    images = [engine.image_inputs.process(noise_image(h, w, seed + i)) for i, (h, w) in enumerate(sizes)]
    body = " and ".join([engine.vision_spec.placeholder] * len(images))
    ids = engine.tokenizer.encode(engine.image_inputs.expand(f"See {body}, then say", images), add_special_tokens=False)
    return ids, images


def _pop_response_logits(engine: LLMEngine, prompt, images, response) -> torch.Tensor:
    """The engine's real POP path: pruned prefill of the image prompt's x_1..x_{N-1}, then full-model
    decode steps feeding x_N and the given response tokens (teacher forcing)."""
    engine.add_request(prompt, SamplingParams(max_new_tokens=len(response)), images=images)
    (req,) = engine.scheduler.schedule().prefill
    assert engine.runner.prefill([req], [len(prompt) - 1]) is None
    rows = []
    for tok in response:
        assert engine.scheduler.schedule().decode == [req]
        rows.append(engine.runner.decode_logits([req])[0])
        req.output_token_ids.append(tok)
    return torch.stack(rows)


def test_prefill_gates_at_zero_equal_pop_on_image_prompts(tiny_vlm, vlm_arch):
    path = tiny_vlm(vlm_arch)
    model = load_model(path)
    skip = (2, 4, 5)
    cfg = EngineConfig(model=path, prune=PruneConfig(skip_layers=skip), kv_cache_memory_mb=8, block_size=4)
    engine = LLMEngine(cfg, model=model, model_path=path)
    prompt, images = _image_prompt(engine, [(40, 70), (48, 48)], seed=7)
    response = engine.tokenizer.encode(" a fox jumps", add_special_tokens=False)
    encoded = engine.encode_images(prompt, images)
    g_pre, g_dec = (g.detach() for g in unit_gates(model))
    g_pre[list(skip)] = 0.0
    with torch.no_grad():
        gated = response_logits(model, prompt, response, g_pre, g_dec, encoded)
        full = response_logits(model, prompt, response, *(g.detach() for g in unit_gates(model)), encoded)
        no_images = response_logits(model, prompt, response, g_pre, g_dec)
    pop = _pop_response_logits(engine, prompt, images, response)
    assert (gated - full).abs().max() > 1e-2, "skipping changed nothing: the test would be vacuous"
    assert (gated - no_images).abs().max() > 1e-2, "the images changed nothing: the test would be vacuous"
    torch.testing.assert_close(gated, pop, rtol=1e-4, atol=1e-4)


def _data_url(height: int, width: int, seed: int) -> str:
    buf = io.BytesIO()
    noise_image(height, width, seed).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_calibrate_cli_on_image_samples(tiny_vlm, tmp_path, capsys):
    path = tiny_vlm("qwen3_vl")

    def sample(text: str, *images: str) -> str:
        parts = [{"type": "image_url", "image_url": {"url": u}} for u in images] + [{"type": "text", "text": text}]
        return json.dumps({"messages": [{"role": "user", "content": parts}]})

    lines = [
        sample("What is this?", _data_url(40, 70, 1)),
        json.dumps({"messages": [{"role": "user", "content": "Once upon a time"}]}),
        sample("Compare them.", _data_url(64, 32, 2), _data_url(48, 48, 3)),
        sample("Too many tokens for the limit.", _data_url(96, 96, 4)),  # 36 image tokens alone
    ]
    data = tmp_path / "vlm.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "profile.json"
    argv = ["calibrate", "--model", path, "--data", str(data), "--num-samples", "4", "--max-new-tokens", "4"]
    argv += ["--max-prompt-tokens", "60", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert f"{data}:4: " in capsys.readouterr().err  # skipped: over --max-prompt-tokens with its image
    profile = ImportanceProfile.load(out)
    assert profile.num_layers == 6 and profile.settings.num_samples == 3
    # The prompts were expanded with their images' tokens (the text one as it is).
    engine_tok = LLMEngine(EngineConfig(model=path, kv_cache_memory_mb=8), model=load_model(path), model_path=path)
    records = read_prompts(data).records
    lengths = [
        len(encode_image_prompt(records[i], engine_tok.tokenizer, engine_tok.image_inputs, 999)[0]) for i in (0, 2)
    ]
    text_len = len(
        engine_tok.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Once upon a time"}], add_generation_prompt=True, return_dict=False
        )
    )
    assert profile.mean_prompt_tokens == pytest.approx((sum(lengths) + text_len) / 3)
    # The last layer's prompt positions feed nothing the response reads: prefill importance is 0.
    assert profile.prefill[-1] == 0.0 and all(v > 0 for v in profile.prefill[:-1])
    assert all(v > 0 for v in profile.decode)
