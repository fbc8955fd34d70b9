"""TTFT of image prompts, POP vs full prefill, at the paper's resolutions (640x480, 1280x720,
2560x1440), with the vision encoder's share of TTFT.

The model is a random Qwen3-VL written with Transformers' own classes and loaded as a checkpoint:
Qwen3-VL's geometry where it sets the token counts (patch 16, 2 x 2 merge, temporal patch 2, its
image processor's pixel range, so 640x480 is 300 image tokens and 2560x1440 3600; interleaved
M-RoPE; DeepStack into the first 3 layers) and CPU-sized widths (``--preset cpu``; ``8b`` is
Qwen3-VL-8B's, for a GPU). The prompt is one image plus a short question in the chat layout.

What is timed, per resolution and plan (in-process ``LLMEngine``, ``torch.inference_mode``, one
warm-up, median of ``--repeats``, the two plans taking turns; on a CPU by default in process CPU
time with one thread, ``--clock cpu``, so other processes on a shared host do not count):
**TTFT** from ``add_request`` (the image already through the checkpoint's image processor, as a
server's edge leaves it) to the first token, which covers the vision encoder, the (pruned)
prefill of ``x_1..x_{N-1}`` and the boundary step; **encoder**, the part spent in
``add_request``, which is the vision encoder on the image. POP changes only the language model's
part, so the speedup of TTFT is ``full / POP`` and the language model's is the ratio of
``TTFT - encoder`` (per run, then the median). The ideal for the language model is the FLOPs ratio of
its prefill (POP_METHOD.md): kept layers' linear and causal attention-score FLOPs against the
skipped layers' K/V projections alone.

    python benchmarks/vlm_ttft.py --json benchmarks/results/vlm/cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from pop_disagg.config import EngineConfig, PruneConfig  # noqa: E402
from pop_disagg.engine.engine import LLMEngine  # noqa: E402
from pop_disagg.engine.sampling import SamplingParams  # noqa: E402
from pop_disagg.models.loader import load_model  # noqa: E402
from pop_disagg.models.tiny import build_tokenizer  # noqa: E402

RESOLUTIONS = ((640, 480), (1280, 720), (2560, 1440))
PRESETS = {
    # CPU-sized widths; Qwen3-VL's token geometry.
    "cpu": dict(
        text=dict(
            hidden_size=512, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=2
        ),
        vision=dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, deepstack_visual_indexes=[1, 2, 3]),
    ),
    # Qwen3-VL-8B-Instruct's geometry.
    "8b": dict(
        text=dict(
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
        ),
        vision=dict(
            depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, deepstack_visual_indexes=[8, 16, 24]
        ),
    ),
}


def write_checkpoint(out: Path, preset: str, seed: int = 0) -> Path:
    """A random Qwen3-VL checkpoint of ``preset``'s widths with Qwen3-VL's token geometry."""
    import transformers as tf

    tokenizer = build_tokenizer()
    specials = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    ids = [tokenizer.convert_tokens_to_ids(t) for t in specials]
    geometry = PRESETS[preset]
    text = dict(
        vocab_size=len(tokenizer),
        head_dim=128,
        max_position_embeddings=8192,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5e6,
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
        },
        **geometry["text"],
    )
    vision = dict(
        patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304, **geometry["vision"]
    )
    vision["out_hidden_size"] = text["hidden_size"]
    cfg = tf.Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        vision_start_token_id=ids[0],
        image_token_id=ids[1],
        vision_end_token_id=ids[2],
        video_token_id=ids[3],
    )
    torch.manual_seed(seed)
    model = tf.Qwen3VLForConditionalGeneration(cfg)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Qwen3-VL's image processor settings: patch 16, merge 2, 65536..16777216 pixels.
    tf.Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 65536, "longest_edge": 16777216}
    ).save_pretrained(out)
    return out


def image_prompt(engine: LLMEngine, width: int, height: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(width)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    processed = engine.image_inputs.process(image)
    spec, tok = engine.vision_spec, engine.tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": f"{spec.placeholder}Describe this image."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    return tok.encode(engine.image_inputs.expand(text, [processed]), add_special_tokens=False), processed


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = time.perf_counter


@torch.inference_mode()
def one_ttft(engine: LLMEngine, ids, image) -> tuple[float, float]:
    """-> (TTFT, encoder seconds) of one request on an idle engine. ``add_request`` is the vision
    encoder (plus a few microseconds of bookkeeping), so its time is the encoder's share."""
    t0 = clock()
    engine.add_request(ids, SamplingParams(max_new_tokens=1, ignore_eos=True), images=[image])
    enc = clock() - t0
    while not any(out.token_ids for out in engine.step()):
        pass
    ttft = clock() - t0
    while engine.has_unfinished():
        engine.step()
    return ttft, enc


def time_ttft(engines: dict[str, LLMEngine], ids, image, repeats: int) -> dict[str, tuple[float, float, float]]:
    """Per engine (median TTFT, median encoder seconds, median language-model seconds = TTFT minus
    encoder of the same run) over ``repeats`` after one warm-up each; the engines take turns within
    a repeat, so a change in the host's load hits them alike."""
    for engine in engines.values():
        one_ttft(engine, ids, image)
    samples = {name: [] for name in engines}
    for _ in range(repeats):
        for name, engine in engines.items():
            samples[name].append(one_ttft(engine, ids, image))
    return {
        name: (
            statistics.median(t for t, _ in runs),
            statistics.median(e for _, e in runs),
            statistics.median(t - e for t, e in runs),
        )
        for name, runs in samples.items()
    }


def ideal_lm_speedup(engine: LLMEngine, num_tokens: int, num_skipped: int) -> float:
    """The FLOPs ideal of the language model's prefill over ``num_tokens`` (POP_METHOD.md, "The
    ideal speedup"): a kept layer costs its linear FLOPs plus causal attention-score work, a
    skipped layer only its K/V projections."""
    a, n = engine.arch, num_tokens
    kv = 2 * n * 2 * a.hidden_size * a.kv_size
    linear = 2 * n * (2 * a.hidden_size * a.q_size + 3 * a.hidden_size * a.intermediate_size) + kv
    scores = 2 * 2 * (n * n / 2) * a.q_size  # QK^T and AV over the causal half
    full = linear + scores
    return a.num_layers * full / ((a.num_layers - num_skipped) * full + num_skipped * kv)


def host_info() -> dict:
    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    lscpu = run(["lscpu"])
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lscpu.splitlines())}
    return {
        "cpu": fields.get("Model name", platform.processor()),
        "cpus": fields.get("CPU(s)"),
        "flags": fields.get("Flags", ""),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=list(PRESETS), default="cpu")
    p.add_argument("--model", default=None, help="an existing Qwen3-VL checkpoint folder instead of a random one")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared host)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="cpu",
        help="cpu: this process's CPU time (with one thread, immune to other processes on a shared host); wall",
    )
    p.add_argument("--resolutions", default=",".join(f"{w}x{h}" for w, h in RESOLUTIONS))
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    global clock
    clock = CLOCKS[args.clock]
    if args.device != "cpu":
        clock = time.perf_counter  # with CUDA synchronised by the token's .item(); CPU time would miss the GPU
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or str(write_checkpoint(Path(tmp), args.preset))
        engines = {}
        for name, prune in (("full", PruneConfig(no_prune=True)), ("pop", PruneConfig())):
            cfg = EngineConfig(
                model=path,
                prune=prune,
                device=args.device,
                dtype=args.dtype,
                kv_cache_memory_mb=512,
                max_model_len=8192,
                max_num_batched_tokens=8192,
                enable_prefix_caching=False,
            )
            engines[name] = LLMEngine(cfg, model=load_model(path, args.dtype, args.device), model_path=path)
        pop = engines["pop"]
        rows = []
        start_load = Path("/proc/loadavg").read_text().split()[:3]
        for res in args.resolutions.split(","):
            w, h = (int(x) for x in res.split("x"))
            ids, image = image_prompt(pop, w, h)
            ttft = time_ttft(engines, ids, image, args.repeats)
            (t_full, enc_full, lm_full), (t_pop, enc_pop, lm_pop) = ttft["full"], ttft["pop"]
            enc = statistics.median([enc_full, enc_pop])
            ideal = ideal_lm_speedup(pop, len(ids) - 1, len(pop.plan.skip_layers))
            row = dict(
                resolution=res,
                prompt_tokens=len(ids),
                image_tokens=image.num_tokens,
                ttft_full_s=t_full,
                ttft_pop_s=t_pop,
                encoder_s=enc,
                lm_full_s=lm_full,
                lm_pop_s=lm_pop,
                speedup=t_full / t_pop,
                lm_speedup=lm_full / lm_pop,
                encoder_share_full=enc / t_full,
                encoder_share_pop=enc / t_pop,
                ideal_lm_speedup=ideal,
                load=Path("/proc/loadavg").read_text().split()[:3],
            )
            rows.append(row)
            print(
                f"{res:>10}  tokens {len(ids):5d}  TTFT full {t_full:7.3f}s  POP {t_pop:7.3f}s  x{row['speedup']:.3f}"
                f"  encoder {enc:6.3f}s ({100 * row['encoder_share_full']:.0f}% / {100 * row['encoder_share_pop']:.0f}%)"
                f"  LM x{row['lm_speedup']:.3f} (ideal x{ideal:.3f})  load {' '.join(row['load'])}",
                flush=True,
            )
    result = dict(
        preset=args.preset if args.model is None else args.model,
        device=args.device,
        dtype=args.dtype,
        clock=args.clock if args.device == "cpu" else "wall",
        threads=args.threads,
        skipped_layers=list(pop.plan.skip_layers),
        num_layers=pop.arch.num_layers,
        host=host_info(),
        load_at_start=start_load,
        rows=rows,
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
