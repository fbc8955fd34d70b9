"""``pop-disagg eval fidelity``: what POP costs in quality, against the full model and alternatives.

For one model, every method in one run (the paper's Tables 1, 3 and 4, at small scale):

* ``full``: the reference.
* ``pop-R%``: POP skipping the deepest ``floor(L*R)`` layers, R in the paper's Table 4 sweep
  (20/25/33/40/50/60%; 33% is the default last third); ``pop-plan`` for a calibrated plan file.
* ``abl-*``: the paper's Table 3 ablations of the reference POP plan (the plan file, else the
  default): shallow third skipped, every third layer skipped, without independent K/V, without
  boundary handling.
* ``static-*``: ShortGPT-style static pruning (same layers gone in both stages): the layers with the
  lowest Block Influence, as many as save POP's prefill FLOPs (``static-bi``), and POP's own
  layers (``static-same``).
* ``*+kvfit``: POP with least-squares-corrected skipped-layer K/V (``pop_disagg/calib/kv_correction.py``),
  fitted with ``kv_correction_method``; ``*+kvfit:<variant>`` the refit variants compared in
  benchmarks/results/kv_refit/README.md (``<method>[-chat|-prose][-<N>x]``: the fit method, the calibration source
  and N times the calibration texts).

Measures, all against the full model: continuation perplexity (teacher-forced on the reference
text), KL of the first generated token's distribution, teacher-forced top-1 agreement, free-running
greedy agreement over the first 32 tokens, BIG-bench multiple-choice accuracy (log-likelihood) and
agreement with the full model's pick (left out, and listed as left out in the report, when BIG-bench
is not prepared or no task is asked for); per layer, the cosine similarity between the method's prompt
K/V and the full model's (the paper's Appendix A) and ShortGPT's Block Influence.

On a vision-language model, ``image_file`` (a JSONL of chat samples with data-URL images, the
format ``calibrate`` takes; ``image_data.py``) replaces the texts: perplexity, KL, top-1 and greedy
agreement and the per-layer K/V similarity are then taken on image + text prompts, with the image
rows pruned like any prompt rows. Block Influence and the K/V fit stay on the text calibration
split, and BIG-bench is text.
"""

from __future__ import annotations

import math
import statistics
import sys
import time

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tqdm.auto import tqdm

from ..calib.kv_correction import DEFAULT_METHOD, METHODS, KVCorrection, fit_kv_correction, load_corrected_prefill_model
from ..models.decoder import CausalLM
from ..pop.plan import PrunePlan
from . import metrics
from .data import (
    BIGBENCH_TASKS,
    TEXT_SOURCES,
    ChoiceExample,
    DataNotInstalledError,
    TextWindow,
    bigbench_task,
    split_encode,
    text_windows,
)
from .image_data import image_windows, with_greedy_answers
from .scorer import CachedScorer, Method, prompt_pass
from .static_prune import block_influence, matched_static_count, prefill_flops_saving, static_plan_from_influence

PAPER_RATIOS = (0.2, 0.25, 1 / 3, 0.4, 0.5, 0.6)
DEFAULT_TASKS = BIGBENCH_TASKS


class FidelityConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str
    dtype: str = "float32"
    num_texts: int = Field(24, ge=2)
    prompt_len: int = Field(128, ge=2)
    continuation_len: int = Field(64, ge=1)
    greedy_len: int = Field(32, ge=1)
    tasks: tuple[str, ...] = DEFAULT_TASKS
    num_choice_examples: int = Field(40, ge=0)
    ratios: tuple[float, ...] = PAPER_RATIOS
    plan_file: str | None = None
    # POP ratios that also get a K/V-corrected variant (and a matched static-BI baseline).
    kv_fit_ratios: tuple[float, ...] = (1 / 3, 0.5)
    static_ratios: tuple[float, ...] = (1 / 3,)
    # Calibration: 32 x 256 tokens. The K/V fit needs many tokens per hidden dimension: on SmolLM2,
    # 2k tokens close 47% of POP's perplexity gap, 4k 62%, 8k 67% (held-out texts).
    num_calib_texts: int = Field(32, ge=1)
    calib_len: int = Field(256, ge=8)
    kv_correction_method: str = DEFAULT_METHOD
    # Extra refit variants at every kv_fit ratio, e.g. ("state", "kv-chat", "kv-4x"): see RefitVariant.
    kv_fit_variants: tuple[str, ...] = ()
    text_file: str | None = None  # own texts (blank-line-separated paragraphs) instead of the packaged ones
    # A VLM's image + text samples (JSONL chat messages with data-URL images) instead of the texts.
    image_file: str | None = None
    max_image_prompt_tokens: int = Field(4096, ge=2)  # longer image samples are skipped (never cut)
    only: tuple[str, ...] | None = None  # run only these method names (plus "full")
    seed: int = 0
    progress: bool = True

    @field_validator("kv_correction_method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"must be one of {', '.join(METHODS)}")
        return v

    @field_validator("kv_fit_variants")
    @classmethod
    def _known_variants(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for spec in v:
            RefitVariant.parse(spec)
        return v

    @model_validator(mode="after")
    def _one_kind_of_prompts(self) -> "FidelityConfig":
        if self.image_file is not None and self.text_file is not None:
            raise ValueError("image_file and text_file each replace the evaluation texts: give one")
        return self


class RefitVariant(BaseModel):
    """How one K/V correction is fitted: ``<method>[-chat|-prose][-<N>x]``, e.g. ``state-chat-4x``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    method: str
    sources: tuple[str, ...] = TEXT_SOURCES  # calibration text sources
    scale: int = 1  # times num_calib_texts

    @classmethod
    def parse(cls, spec: str) -> "RefitVariant":
        method, *rest = spec.split("-")
        if method not in METHODS:
            raise ValueError(f"K/V refit variant {spec!r}: method must be one of {', '.join(METHODS)}")
        kw: dict = {"method": method}
        for part in rest:
            if part == "chat":
                kw["sources"] = ("sharegpt",)
            elif part == "prose":
                kw["sources"] = ("britannica",)
            elif part.endswith("x") and part[:-1].isdigit() and int(part[:-1]) >= 1:
                kw["scale"] = int(part[:-1])
            else:
                raise ValueError(f"K/V refit variant {spec!r}: unknown part {part!r} (chat, prose or <N>x)")
        return cls(**kw)


def refit_variant(cfg: FidelityConfig, method_name: str) -> RefitVariant:
    """The variant a ``*+kvfit[:variant]`` method name stands for."""
    _, _, spec = method_name.partition("+kvfit")
    return RefitVariant.parse(spec[1:]) if spec else RefitVariant(method=cfg.kv_correction_method)


def ratio_label(ratio: float) -> str:
    return f"{round(ratio * 100)}%"


def build_methods(
    cfg: FidelityConfig, num_layers: int, influence: list[float] | None, arch, plan_from_file: PrunePlan | None
) -> list[Method]:
    """The method list, in table order."""
    L = num_layers
    methods = [Method(name="full", group="full", plan=PrunePlan.none(L), note="reference")]
    for r in cfg.ratios:
        methods.append(Method(name=f"pop-{ratio_label(r)}", group="pop", plan=PrunePlan.from_ratio(L, r)))
    ref = plan_from_file or PrunePlan.default(L)
    if plan_from_file is not None:
        methods.append(Method(name="pop-plan", group="pop", plan=plan_from_file, note=f"plan file: {cfg.plan_file}"))
        methods.append(
            Method(
                name="pop-plan+kvfit",
                group="corrected",
                plan=plan_from_file,
                has_kv_correction=True,
                note="the plan file's layers with least-squares K/V",
            )
        )
    k = len(ref.skip_layers)
    methods += [
        Method(
            name="abl-first-third",
            group="ablation",
            plan=PrunePlan(num_layers=L, skip_layers=tuple(range(L // 3))),
            note="shallow third skipped",
        ),
        Method(
            name="abl-every-third", group="ablation", plan=PrunePlan.every_third(L), note="every third layer skipped"
        ),
        Method(
            name="abl-no-indep-kv",
            group="ablation",
            plan=ref.model_copy(update={"independent_kv": False}),
            note="skipped layers hold no prompt K/V",
        ),
        Method(
            name="abl-no-boundary",
            group="ablation",
            plan=ref.model_copy(update={"boundary_handling": False}),
            note="first token from the pruned pass",
        ),
    ]
    for r in cfg.static_ratios:
        pop = PrunePlan.from_ratio(L, r)
        if influence is not None:
            n = matched_static_count(arch, pop, cfg.prompt_len)
            plan = static_plan_from_influence(influence, n)
            methods.append(
                Method(
                    name=f"static-bi-{ratio_label(r)}",
                    group="static",
                    plan=plan,
                    is_static=True,
                    note=f"{n} lowest-BI layers, prefill FLOPs matched to pop-{ratio_label(r)}",
                )
            )
    methods.append(
        Method(
            name=f"static-same-{k}L",
            group="static",
            plan=ref,
            is_static=True,
            note="POP's layers, removed in both stages",
        )
    )
    for r in cfg.kv_fit_ratios:
        methods.append(
            Method(
                name=f"pop-{ratio_label(r)}+kvfit",
                group="corrected",
                plan=PrunePlan.from_ratio(L, r),
                has_kv_correction=True,
                note=f"least-squares K/V of skipped layers ({cfg.kv_correction_method})",
            )
        )
        for v in cfg.kv_fit_variants:
            methods.append(
                Method(
                    name=f"pop-{ratio_label(r)}+kvfit:{v}",
                    group="corrected",
                    plan=PrunePlan.from_ratio(L, r),
                    has_kv_correction=True,
                    note=f"refit variant {v}",
                )
            )
    if cfg.only is not None:
        methods = [m for m in methods if m.name == "full" or m.name in cfg.only]
    return methods


class FidelityRun:
    """Holds the model, data and scorer of one ``eval fidelity`` run."""

    def __init__(self, cfg: FidelityConfig, model: CausalLM, tokenizer, model_path: str):
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.arch = model.arch
        self.timings: dict[str, float] = {}
        self._calib: dict[tuple, list[list[int]]] = {}  # (sources, scale) -> calibration token lists

    def _bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=not self.cfg.progress, leave=False)

    # ---- data ---------------------------------------------------------------------------------------
    def load_data(self) -> None:
        t0 = time.perf_counter()
        c = self.cfg
        self.skipped: list[str] = []
        if c.image_file is not None:
            self.texts, self.skipped = image_windows(
                c.image_file,
                self.tokenizer,
                self.model_path,
                self.model,
                c.num_texts,
                c.max_image_prompt_tokens,
                c.continuation_len,
            )
            for line in self.skipped:
                print(f"[pop-disagg] skipped {line}", file=sys.stderr)
        else:
            self.texts: list[TextWindow] = text_windows(
                self.tokenizer, c.num_texts, c.prompt_len, c.continuation_len, "eval", c.seed, c.text_file
            )
        self.calib_ids = self.calibration(TEXT_SOURCES, 1)
        self.tasks: dict[str, list[tuple[list[int], list[list[int]], int]]] = {}
        # Measures this run cannot take, with the reason: the report lists them (no silent gaps).
        self.left_out: list[dict[str, str]] = []
        if not c.tasks or not c.num_choice_examples:
            self.left_out.append(
                {
                    "measure": "BIG-bench multiple choice (accuracy, agreement with the full model)",
                    "reason": "no tasks asked for (--tasks '' or --num-choice-examples 0)",
                }
            )
        for name in c.tasks if c.num_choice_examples else ():
            try:
                examples: list[ChoiceExample] = bigbench_task(name, c.num_choice_examples, c.seed)
            except DataNotInstalledError as exc:
                self.left_out.append({"measure": f"BIG-bench multiple choice: {name}", "reason": str(exc)})
                print(f"[pop-disagg] left out BIG-bench task {name}: {exc}", file=sys.stderr)
                continue
            encoded = []
            for e in examples:
                pairs = [split_encode(self.tokenizer, e.context, ch) for ch in e.choices]
                encoded.append((pairs[0][0], [p[1] for p in pairs], e.gold))
            self.tasks[name] = encoded
        self.timings["data"] = time.perf_counter() - t0

    def calibration(self, sources: tuple[str, ...], scale: int) -> list[list[int]]:
        """Calibration token lists (``scale`` x num_calib_texts x calib_len) from the calib split."""
        key = (tuple(sources), scale)
        cache = self._calib
        if key not in cache:
            c = self.cfg
            if c.text_file is not None and tuple(sources) != TEXT_SOURCES:
                raise ValueError(
                    "refit variants with their own calibration source need the packaged texts (no --text-file)"
                )
            windows = text_windows(
                self.tokenizer, scale * c.num_calib_texts, c.calib_len, 1, "calib", c.seed, c.text_file, sources
            )
            cache[key] = [w.prompt_ids + w.continuation_ids for w in windows]
        return cache[key]

    def fill_answers(self, scorer: CachedScorer, full: Method) -> None:
        """Image samples without an answer: the full model's greedy answer becomes their continuation."""
        pending = [w for w in self.texts if not w.continuation_ids]
        answers = []
        for a in range(0, len(pending), 8):
            chunk = pending[a : a + 8]
            answers += scorer.greedy(
                [w.prompt_ids for w in chunk], full, self.cfg.continuation_len, images=[w.images for w in chunk]
            )
        self.texts = with_greedy_answers(self.texts, answers)

    # ---- per method ---------------------------------------------------------------------------------
    def evaluate(self, method: Method, scorer: CachedScorer, reference: dict | None) -> dict:
        t0, c0 = time.perf_counter(), time.process_time()
        prompts = [w.prompt_ids for w in self.texts]
        conts = [w.continuation_ids for w in self.texts]
        images = [w.images for w in self.texts]
        out: dict = {
            "name": method.name,
            "group": method.group,
            "note": method.note,
            "skip_layers": list(method.plan.skip_layers),
            "num_skipped": len(method.plan.skip_layers),
            "is_static": method.is_static,
            "independent_kv": method.plan.independent_kv,
            "boundary_handling": method.plan.boundary_handling,
            "prefill_flops_saving": prefill_flops_saving(
                self.arch, len(method.plan.skip_layers), self.cfg.prompt_len, method.is_static
            ),
        }
        scores = []
        for a in range(0, len(prompts), 8):  # 8 texts per call bounds activation memory
            scores += scorer.score(
                prompts[a : a + 8],
                conts[a : a + 8],
                method,
                keep_first=True,
                greedy_tokens=self.cfg.greedy_len,
                images=images[a : a + 8],
            )
        greedy = [s.greedy_ids for s in scores]
        out["ppl"] = metrics.perplexity([s.token_logprobs for s in scores])
        out["nll_per_text"] = [float(-s.token_logprobs.mean()) for s in scores]
        choice = {}
        for name, examples in self.tasks.items():
            per = []
            for a in range(0, len(examples), 16):
                chunk = examples[a : a + 16]
                per += scorer.choice_logprobs([e[0] for e in chunk], [e[1] for e in chunk], method)
            choice[name] = per
        out["choice_scores"] = choice
        out["mc"] = {
            name: {"acc": metrics.choice_accuracy(per, [e[2] for e in self.tasks[name]])}
            for name, per in choice.items()
        }
        self._first = [s.first_logprobs for s in scores]
        if reference is None:
            out["argmax"] = [s.argmax.tolist() for s in scores]
            out["greedy_tokens"] = greedy
        else:
            kl = metrics.kl_divergence(torch.stack(reference["_first"]), torch.stack(self._first))
            out["kl_first"] = float(kl.mean())
            out["kl_first_median"] = float(kl.median())
            out["top1_tf"] = statistics.fmean(
                metrics.top1_agreement(r, s.argmax) for r, s in zip(reference["argmax"], scores)
            )
            agree = [metrics.greedy_agreement(r, g) for r, g in zip(reference["greedy_tokens"], greedy)]
            out["greedy_agree"] = statistics.fmean(a for a, _ in agree)
            out["greedy_prefix"] = statistics.fmean(p for _, p in agree)
            out["ppl_ratio"] = out["ppl"] / reference["ppl"]
            for name, per in choice.items():
                picks, ref_picks = metrics.choice_picks(per), metrics.choice_picks(reference["choice_scores"][name])
                out["mc"][name]["agree_full"] = sum(a == b for a, b in zip(picks, ref_picks)) / len(picks)
        if out["mc"]:
            out["mc_acc"] = statistics.fmean(v["acc"] for v in out["mc"].values())
            if reference is not None:
                out["mc_agree"] = statistics.fmean(v["agree_full"] for v in out["mc"].values())
        out["seconds"] = time.perf_counter() - t0
        out["cpu_seconds"] = (
            time.process_time() - c0
        )  # the container's cores are shared: CPU time is the stabler figure
        return out

    # ---- per layer ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def prompt_kv(self, model: CausalLM, plan: PrunePlan | None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """K/V every layer writes for the eval prompts' first N-1 tokens (concatenated over texts)."""
        got: dict[int, list] = {}
        for w in self.texts:
            ids = w.prompt_ids[:-1]
            n = len(ids)
            pos, attn, vision = prompt_pass(
                model.arch,
                [w.images],
                [n],
                torch.arange(n, device=model.device),
                lambda l, k, v: got.setdefault(l, []).append((k.float(), v.float())),
            )
            model(torch.tensor(ids, device=model.device), pos, attn, plan=plan, vision=vision)
        return {l: (torch.cat([k for k, _ in kv]), torch.cat([v for _, v in kv])) for l, kv in got.items()}

    def kv_similarity(self, full_kv, model: CausalLM, plan: PrunePlan) -> dict[str, list[float]]:
        """Per layer mean cosine similarity (over tokens and KV heads) of K and V with the full model's."""
        kv = self.prompt_kv(model, plan)
        k_sim, v_sim = [], []
        for l in range(self.arch.num_layers):
            k_sim.append(float(metrics.cosine_per_row(kv[l][0], full_kv[l][0]).mean()))
            v_sim.append(float(metrics.cosine_per_row(kv[l][1], full_kv[l][1]).mean()))
        return {"k": k_sim, "v": v_sim}


def run_fidelity(
    cfg: FidelityConfig, model: CausalLM | None = None, tokenizer=None, model_path: str | None = None
) -> tuple[dict, dict[str, KVCorrection]]:
    """Run every method; return (results dict, the K/V corrections fitted, by method name)."""
    from ..models.loader import load_model
    from ..models.registry import resolve_model

    t_start, c_start = time.perf_counter(), time.process_time()
    if model is None:
        model_path = str(resolve_model(cfg.model))
        model = load_model(model_path, cfg.dtype, "cpu")
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
    run = FidelityRun(cfg, model, tokenizer, model_path)
    run.load_data()
    L = model.arch.num_layers
    plan_from_file = PrunePlan.load(cfg.plan_file, L) if cfg.plan_file else None

    t0 = time.perf_counter()
    influence = block_influence(model, run.calib_ids[:16])  # a ranking; 4k tokens are plenty
    run.timings["block_influence"] = time.perf_counter() - t0
    methods = build_methods(cfg, L, influence, model.arch, plan_from_file)

    # K/V corrections: fitted once per plan on the calibration split, saved beside the plan file.
    corrections: dict[str, KVCorrection] = {}
    prefill_models: dict[str, CausalLM] = {}
    t0 = time.perf_counter()
    for m in methods:
        if m.has_kv_correction:
            variant = refit_variant(cfg, m.name)
            corr = fit_kv_correction(
                model, m.plan, run.calibration(variant.sources, variant.scale), method=variant.method
            )
            corrections[m.name] = corr
            prefill_models[m.name] = load_corrected_prefill_model(model_path, corr, cfg.dtype, "cpu")
    run.timings["kv_fit"] = time.perf_counter() - t0

    longest = max(cfg.prompt_len, *(len(w.prompt_ids) for w in run.texts))
    max_tokens = 16 * (longest + max(cfg.continuation_len, cfg.greedy_len) + 8) + 4096
    scorer = CachedScorer(model, max_tokens, prefill_models)
    if any(not w.continuation_ids for w in run.texts):
        run.fill_answers(scorer, methods[0])
    results, reference = [], None
    bar = tqdm(methods, desc=f"fidelity {cfg.model}", disable=not cfg.progress)
    for m in bar:
        bar.set_postfix_str(m.name)
        r = run.evaluate(m, scorer, reference)
        if reference is None:
            reference = dict(r, _first=run._first)
        results.append(r)

    # Per-layer curves: K/V cosine with the full model for POP plans (and their corrections).
    t0 = time.perf_counter()
    full_kv = run.prompt_kv(model, None)
    layer_curves: dict = {"block_influence": influence, "kv_similarity": {}}
    for m in methods:
        if m.name in ("pop-33%", "pop-50%", "pop-plan") or m.has_kv_correction:
            target = prefill_models.get(m.name, model)
            layer_curves["kv_similarity"][m.name] = run.kv_similarity(full_kv, target, m.plan)
    run.timings["layer_curves"] = time.perf_counter() - t0

    for r in results:
        r.pop("argmax", None)
        r.pop("greedy_tokens", None)
        r.pop("choice_scores", None)
    return {
        "model": cfg.model,
        "model_path": model_path,
        "arch": {
            "family": model.arch.family,
            "num_layers": L,
            "hidden_size": model.arch.hidden_size,
            "num_heads": model.arch.num_heads,
            "num_kv_heads": model.arch.num_kv_heads,
        },
        "config": cfg.model_dump(),
        "data": {
            "num_texts": len(run.texts),
            "sources": sorted({w.source for w in run.texts}),
            "num_calib_tokens": sum(len(t) for t in run.calib_ids),
            "tasks": {k: len(v) for k, v in run.tasks.items()},
            **(_image_data(run) if cfg.image_file is not None else {}),
        },
        "left_out": run.left_out,
        "methods": results,
        "layers": layer_curves,
        "kv_correction": {
            name: {
                "skip_layers": list(c.plan.skip_layers),
                "method": c.method,
                "num_calibration_tokens": c.num_calibration_tokens,
                "calibration_sources": list(refit_variant(cfg, name).sources),
                "fit_seconds": c.fit_seconds,
                "residuals": {str(l): r for l, r in c.residuals.items()},
            }
            for name, c in corrections.items()
        },
        "timings_s": {
            **run.timings,
            "total": time.perf_counter() - t_start,
            "total_cpu": time.process_time() - c_start,
        },
        "hardware": _hardware(),
    }, corrections


def _image_data(run: FidelityRun) -> dict:
    """What the image prompts were: their number of images and prompt lengths, the samples skipped."""
    lengths = [len(w.prompt_ids) for w in run.texts]
    return {
        "num_images": sum(len(w.images.spans) for w in run.texts),
        "num_image_tokens": sum(len(w.images.positions) for w in run.texts),
        "prompt_tokens": [min(lengths), max(lengths)],
        "skipped": run.skipped,
    }


def _hardware() -> str:
    import os
    import platform

    return f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} visible cores, torch {torch.__version__}"


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
