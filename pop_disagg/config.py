"""The configuration tree: frozen, validated once at the boundary (CLI, server, tests).

``EngineConfig`` says what model to run and how (dtype, device, KV budget, batching limits, prune
plan); ``ServeConfig`` wraps it with how the server deploys it (topology, worker counts, timeouts,
placement, the served plan family). Values that depend on the checkpoint (the resolved plan, the context limit) are computed
from it by methods that take the ``ModelArch``; nothing mutates a config after construction.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .models.arch import ModelArch
from .pop.plan import PlanError, PlanFamily, PrunePlan


class PruneConfig(BaseModel):
    """How to choose the prefill plan. At most one of ratio / skip_layers / plan_file / no_prune."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    ratio: float | None = Field(None, ge=0.0, lt=1.0)
    skip_layers: tuple[int, ...] | None = None
    plan_file: str | None = None
    no_prune: bool = False
    independent_kv: bool = True
    boundary_handling: bool = True

    @model_validator(mode="after")
    def _one_choice(self) -> "PruneConfig":
        chosen = [
            n
            for n, v in (("ratio", self.ratio), ("skip_layers", self.skip_layers), ("plan_file", self.plan_file))
            if v is not None
        ]
        if self.no_prune:
            chosen.append("no_prune")
        if len(chosen) > 1:
            raise PlanError(f"choose at most one of ratio / skip_layers / plan_file / no_prune, got {chosen}")
        return self

    def resolve(self, num_layers: int) -> PrunePlan:
        kw = dict(independent_kv=self.independent_kv, boundary_handling=self.boundary_handling)
        if self.no_prune:
            return PrunePlan(num_layers=num_layers, **kw)
        if self.plan_file is not None:
            plan = PrunePlan.load(self.plan_file, num_layers)
            return plan.model_copy(update=kw) if (not self.independent_kv or not self.boundary_handling) else plan
        if self.skip_layers is not None:
            return PrunePlan(num_layers=num_layers, skip_layers=self.skip_layers, **kw)
        if self.ratio is not None:
            return PrunePlan.from_ratio(num_layers, self.ratio, **kw)
        return PrunePlan.default(num_layers, **kw)


class EngineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field("smollm2-135m-instruct", description="registry name or checkpoint folder")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    block_size: int = Field(16, ge=1)
    kv_cache_memory_mb: float | None = Field(
        None, gt=0, description="KV budget; default 512 MiB on CPU, 85% of free GPU memory on CUDA"
    )
    max_num_seqs: int = Field(64, ge=1, description="running requests at most")
    max_num_batched_tokens: int = Field(
        8192,
        ge=1,
        description="prompt tokens per prefill step at most; with chunked prefill, tokens per step (decode + prompt chunks)",
    )
    enable_chunked_prefill: bool = Field(
        False,
        description="vLLM's flag: steps mix decode tokens with prompt chunks, max_num_batched_tokens in all; a prefill worker chunks long prompts",
    )
    enable_prefix_caching: bool = Field(
        True,
        description="vLLM's flag (and default): reuse cached full KV blocks of an equal prefix computed under the same plan",
    )
    max_model_len: int | None = Field(None, ge=2, description="context limit; default the model's")
    prune: PruneConfig = PruneConfig()
    seed: int = 0
    enforce_eager: bool = Field(False, description="vLLM's flag: never compile or graph-capture the decode step")
    compile_decode_on_cpu: bool = Field(
        False, description="torch.compile the decode step on CPU too (slow to start; off by default)"
    )
    cpu_blas: Literal["auto", "torch", "openblas", "onednn"] = Field(
        "auto",
        description="CPU float32 GEMMs: oneDNN on prepacked weights, torch's (MKL) or numpy's OpenBLAS; auto = oneDNN where torch has it (models/cpu_blas.py)",
    )

    @property
    def use_compiled_decode(self) -> bool:
        """CUDA: CUDA-graph the decode step per batch bucket; CPU: only when asked (compile time)."""
        if self.enforce_eager:
            return False
        return self.device == "cuda" or self.compile_decode_on_cpu

    def context_limit(self, arch: ModelArch) -> int:
        return min(self.max_model_len or arch.max_position_embeddings, arch.max_position_embeddings)

    def plan(self, arch: ModelArch) -> PrunePlan:
        return self.prune.resolve(arch.num_layers)


Strategy = Literal["pack", "spread"]


class PlacementConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    strategy: Strategy = Field(
        "pack", description="pack: prefill/decode pairs share a node; spread: roles on different nodes"
    )
    timeout_s: float = Field(120.0, gt=0, description="start-up fails if the placement group is not ready by then")
    cpus_per_worker: float | None = Field(
        None,
        gt=0,
        description="CPU in each bundle; default: 1 per GPU worker (an equal share when the cluster has fewer CPUs), a token share per CPU worker",
    )


# Where prefilling the uncached rest on the decode worker costs no more than a KV transfer round
# trip (docs/serving.md, "Across the split": how it was measured).
DEFAULT_MAX_LOCAL_PREFILL_TOKENS = 64


class MediaConfig(BaseModel):
    """Images a request may bring (vision-language models), checked at the edge (``server/frontend/multimodal.py``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_images_per_prompt: int = Field(4, ge=0, description="vLLM's --limit-mm-per-prompt image=N")
    allowed_media_domains: tuple[str, ...] = Field(
        (), description="hosts whose http(s) image URLs are fetched; none: only data: URLs (vLLM's flag)"
    )
    max_image_bytes: int = Field(20 * 2**20, gt=0, description="an encoded image's size at most")
    max_image_pixels: int = Field(7680 * 4320, gt=0, description="width x height at most (read from the header)")
    min_image_side: int = Field(8, ge=1, description="width and height at least")
    fetch_timeout_s: float = Field(10.0, gt=0)


class ServeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    engine: EngineConfig = EngineConfig()
    topology: Literal["disaggregated", "colocated"] = "disaggregated"
    prefill: Literal["pop", "full"] = "pop"
    num_prefill: int = Field(1, ge=1)
    num_decode: int = Field(1, ge=1)
    transfer_timeout_s: float = Field(30.0, gt=0, description="a KV transfer that stalls this long fails its request")
    worker_timeout_s: float = Field(
        30.0, gt=0, description="a worker that answers no health probe this long is declared dead and restarted"
    )
    kv_failure_policy: Literal["recompute", "fail"] = Field(
        "recompute",
        description="a request whose KV transfer failed is re-prefilled (recompute) or failed with UNAVAILABLE",
    )
    num_threads: int = Field(1, ge=1, description="torch threads per worker actor")
    max_local_prefill_tokens: int = Field(
        DEFAULT_MAX_LOCAL_PREFILL_TOKENS,
        ge=0,
        description="disaggregated: a prompt whose prefix the decode worker's prefix cache holds in part, but for at most this many tokens, is prefilled there, with no transfer",
    )
    kv_correction: str | None = Field(
        None,
        description="least-squares K/V for the skipped layers (pop-disagg eval fidelity's kv_correction.safetensors)",
    )
    placement: PlacementConfig = PlacementConfig()
    media: MediaConfig = MediaConfig()
    prune_ratios: tuple[float, ...] | None = Field(
        None, description="a last-layers plan family; the first ratio is the default"
    )
    prune_family: str | None = Field(None, description="a plan family JSON from `pop-disagg plan --ratios`")
    adaptive_depth: bool = Field(
        False, description="requests without prune_ratio get the mildest plan predicted to meet the TTFT SLO"
    )
    ttft_slo_ms: float | None = Field(None, gt=0)
    depth_rule: Literal["lookahead", "greedy"] = Field(
        "lookahead", description="the adaptive rule (server/control/depth.py): plan for the queue behind, or greedy"
    )

    @model_validator(mode="after")
    def _check_depth(self) -> "ServeConfig":
        if self.has_family:
            if self.prune_ratios is not None and self.prune_family is not None:
                raise ValueError("choose one of --prune-ratios and a family --prune-plan")
            if self.engine.prune != PruneConfig():
                raise ValueError(
                    "a plan family (--prune-ratios / family --prune-plan) replaces --prune-ratio / --skip-layers / --no-prune"
                )
            if not (self.is_disaggregated and self.prefill == "pop"):
                raise ValueError(
                    "a plan family needs --topology disaggregated --prefill pop (the prefill worker picks the plan per request)"
                )
            if self.kv_correction is not None:
                raise ValueError(
                    "kv_correction: not supported with a plan family yet (it is fitted for one plan's skipped layers); serve one plan with --prune-ratio / --prune-plan"
                )
        if self.adaptive_depth and (
            self.ttft_slo_ms is None
            or not self.has_family
            or (self.prune_ratios is not None and len(self.prune_ratios) < 2)
        ):
            raise ValueError(
                "--adaptive-depth needs --ttft-slo-ms and a plan family of two or more plans (--prune-ratios 0.2,0.33,0.5)"
            )
        if self.ttft_slo_ms is not None and not self.adaptive_depth:
            raise ValueError("--ttft-slo-ms is the target of --adaptive-depth; give both")
        return self

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        if self.prefill == "full" and not self.engine.prune.no_prune and self.engine.prune != PruneConfig():
            raise ValueError("--prefill full runs every layer; drop --prune-ratio / --prune-plan")
        if self.kv_correction is not None and not (self.is_disaggregated and self.prefill == "pop"):
            # Only a prefill-only instance can swap in the fitted K/V weights: a colocated engine
            # shares them with decode, which must keep the originals.
            raise ValueError("kv_correction: needs --topology disaggregated --prefill pop")
        return self

    @property
    def is_disaggregated(self) -> bool:
        return self.topology == "disaggregated"

    @property
    def has_family(self) -> bool:
        return self.prune_ratios is not None or self.prune_family is not None

    @property
    def worker_engine(self) -> EngineConfig:
        """The engine config every worker runs: ``full`` means the empty plan; a family, its default plan."""
        if self.prefill == "full":
            return self.engine.model_copy(update={"prune": PruneConfig(no_prune=True)})
        if self.prune_ratios is not None:
            return self.engine.model_copy(update={"prune": PruneConfig(ratio=self.prune_ratios[0])})
        if self.prune_family is not None:
            return self.engine.model_copy(
                update={"prune": PruneConfig(skip_layers=PlanFamily.load(self.prune_family).default_plan.skip_layers)}
            )
        return self.engine

    def family(self, arch) -> PlanFamily:
        """The plans the server offers (mildest first); one plan is a family of one."""
        if self.prune_ratios is not None:
            return PlanFamily.from_ratios(arch.num_layers, list(self.prune_ratios))
        if self.prune_family is not None:
            return PlanFamily.load(self.prune_family, arch.num_layers)
        plan = self.worker_engine.plan(arch)
        nominal = self.worker_engine.prune.ratio if self.worker_engine.prune.ratio is not None else round(plan.ratio, 4)
        return PlanFamily(ratios=(nominal,), plans=(plan,), default_ratio=nominal)

    @property
    def label(self) -> str:
        size = f"{self.num_prefill}P{self.num_decode}D" if self.is_disaggregated else f"{self.num_decode}x"
        return f"{self.topology}+{self.prefill} ({size})"
