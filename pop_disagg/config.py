"""The configuration tree: frozen, validated once at the boundary (CLI, server, tests).

``EngineConfig`` says what model to run and how (dtype, device, KV budget, batching limits, prune
plan). Values that depend on the checkpoint (the resolved plan, the context limit) are computed
from it by methods that take the ``ModelArch``; nothing mutates a config after construction.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .models.arch import ModelArch
from .pop.plan import PlanError, PrunePlan


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
        chosen = [n for n, v in (("ratio", self.ratio), ("skip_layers", self.skip_layers), ("plan_file", self.plan_file)) if v is not None]
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
    kv_cache_memory_mb: float | None = Field(None, gt=0, description="KV budget; default 512 MiB on CPU, 85% of free GPU memory on CUDA")
    max_num_seqs: int = Field(64, ge=1, description="running requests at most")
    max_num_batched_tokens: int = Field(8192, ge=1, description="prompt tokens per prefill step at most; with chunked prefill, tokens per step (decode + prompt chunks)")
    enable_chunked_prefill: bool = Field(False, description="vLLM's flag: steps mix decode tokens with prompt chunks, max_num_batched_tokens in all; a prefill worker chunks long prompts")
    max_model_len: int | None = Field(None, ge=2, description="context limit; default the model's")
    prune: PruneConfig = PruneConfig()
    seed: int = 0
    enforce_eager: bool = Field(False, description="vLLM's flag: never compile or graph-capture the decode step")
    compile_decode_on_cpu: bool = Field(False, description="torch.compile the decode step on CPU too (slow to start; off by default)")
    cpu_blas: Literal["auto", "torch", "openblas"] = Field(
        "auto", description="CPU float32 GEMMs: torch's (MKL) or numpy's OpenBLAS; auto = OpenBLAS on AMD CPUs (models/cpu_blas.py)")

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
