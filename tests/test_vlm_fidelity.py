"""Fidelity on image prompts: the scorer runs an image prompt as the engine does (its teacher-forced
log-probabilities and greedy tokens equal the engine's POP and full paths, Qwen3-VL and Gemma-3;
without the images they differ), and ``pop-disagg eval fidelity --image-file`` takes the JSONL of
image chat samples that ``calibrate`` takes and reports every method's measures on them."""

from __future__ import annotations

import base64
import io
import json
import math

import pytest
import torch

from pop_disagg.cli import main
from pop_disagg.engine.sampling import SamplingParams
from pop_disagg.eval.scorer import CachedScorer, Method
from pop_disagg.pop.plan import PrunePlan

from .test_vlm import SIZES, _engine, _prompt
from .test_vlm_calibration import _pop_response_logits
from .vlm_reference import noise_image


def _method(engine, which: str) -> Method:
    L = engine.arch.num_layers
    plan = PrunePlan.default(L) if which == "pop" else PrunePlan.none(L)
    return Method(name=which, group="pop" if which == "pop" else "full", plan=plan)


@pytest.mark.parametrize("which", ["pop", "full"])
def test_scorer_on_image_prompts_equals_the_engine(tiny_vlm, vlm_arch, which):
    path = tiny_vlm(vlm_arch)
    engine = _engine(path, prune={"no_prune": True} if which == "full" else {})
    method = _method(engine, which)
    assert method.plan.skip_layers == engine.plan.skip_layers
    ids, images = _prompt(engine, SIZES["two"], seed=3)
    response = engine.tokenizer.encode(" two noisy pictures side by side", add_special_tokens=False)
    want = torch.log_softmax(_pop_response_logits(engine, ids, images, response), -1)
    want = want.gather(1, torch.tensor(response)[:, None])[:, 0]
    encoded = engine.encode_images(ids, images)
    scorer = CachedScorer(engine.model, 4096)
    got = scorer.score([ids], [response], method, images=[encoded])[0].token_logprobs
    assert (got - want).abs().max().item() < 1e-4
    # The comparison sees the images: scored as plain token ids, the prompt reads otherwise.
    blind = scorer.score([ids], [response], method)[0].token_logprobs
    assert (blind - want).abs().max().item() > 1e-3
    # Greedy tokens from the same prompt pass equal the engine's generation.
    greedy = scorer.greedy([ids], method, 6, images=[encoded])[0]
    out = engine.generate([ids], SamplingParams(max_new_tokens=6, ignore_eos=True), images=[images])[0]
    assert greedy == out.token_ids
    assert scorer.blocks.num_free_blocks == scorer.blocks.num_blocks


def _data_url(height: int, width: int, seed: int) -> str:
    buf = io.BytesIO()
    noise_image(height, width, seed).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_eval_fidelity_on_an_image_file(tiny_vlm, tmp_path, capsys):
    path = tiny_vlm("qwen3_vl")

    def user(text: str, *urls: str) -> dict:
        parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}]
        return {"role": "user", "content": parts}

    lines = [
        {"messages": [user("What is this?", _data_url(40, 70, 1)), {"role": "assistant", "content": "A grey noise."}]},
        {"messages": [user("Compare them.", _data_url(64, 32, 2), _data_url(48, 48, 3))]},  # no answer
        {"messages": [{"role": "user", "content": "Once upon a time"}]},  # text only: skipped
        {"messages": [user("Too long with its image.", _data_url(96, 96, 4))]},  # 36 image tokens alone
    ]
    data = tmp_path / "images.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "fid.json"
    argv = ["eval", "fidelity", "--model", path, "--image-file", str(data), "--max-image-prompt-tokens", "60"]
    argv += ["--num-texts", "4", "--continuation-len", "6", "--greedy-len", "4", "--tasks", ""]
    argv += ["--num-calib-texts", "2", "--ratios", "0.34,0.5", "--kv-fit-ratios", "0.5", "--static-ratios", ""]
    argv += ["--output", str(out), "--no-progress", "--no-plots"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"{data}:3: no image in the prompt" in err
    assert f"{data}:4: 77 prompt tokens with its images, over --max-image-prompt-tokens 60" in err
    res = json.loads(out.read_text())
    d = res["data"]
    assert d["num_texts"] == 2 and d["num_images"] == 3
    assert sorted(d["sources"]) == ["images + reference answers", "images + the full model's answers"]
    engine = _engine(path)
    assert d["num_image_tokens"] == sum(
        engine.image_inputs.process(noise_image(h, w)).num_tokens for h, w in [(40, 70), (64, 32), (48, 48)]
    )
    methods = {m["name"]: m for m in res["methods"]}
    full = methods["full"]
    assert math_finite(full["ppl"]) and "kl_first" not in full
    for name in ("pop-34%", "pop-50%", "abl-no-boundary", "pop-50%+kvfit"):
        m = methods[name]
        assert m["kl_first"] >= 0 and 0 <= m["top1_tf"] <= 1 and 0 <= m["greedy_agree"] <= 1
        assert math_finite(m["ppl_ratio"])
    # Deeper pruning drifts further from the full model on these prompts.
    assert methods["pop-50%"]["kl_first"] > 0
    # Per-layer K/V similarity on the image prompts: up to the first skipped layer (its input is a
    # kept layer's output) they equal the full model's; deeper skipped layers read a pruned state.
    sim = res["layers"]["kv_similarity"]["pop-50%"]
    skipped = methods["pop-50%"]["skip_layers"]
    assert all(sim["k"][l] == pytest.approx(1.0, abs=1e-5) for l in range(skipped[0] + 1))
    assert all(sim["k"][l] < 1 - 1e-4 for l in skipped[1:])
    assert "image prompts" in out.with_suffix(".md").read_text()


def test_image_file_and_text_file_exclude_each_other():
    from pydantic import ValidationError

    from pop_disagg.eval.fidelity import FidelityConfig

    with pytest.raises(ValidationError, match="give one"):
        FidelityConfig(model="m", image_file="a.jsonl", text_file="b.txt")


def math_finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)
