"""Prune plans: which layers the POP prefill skips, plus the paper's research ablation switches.

A plan is a frozen value resolved against a concrete layer count. The default skips the deepest
``floor(L/3)`` layers (POP paper, Sec. 4). ``first_third`` and ``every_third`` are the paper's
layer-selection ablations (Table 3); ``independent_kv=False`` and ``boundary_handling=False`` its
component ablations.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from ..errors import format_validation_error


# How `pop-disagg plan` picks layers from an importance profile (see pop_disagg/calib/importance.py).
STRATEGIES = ("last", "importance")


class PlanError(ValueError):
    """An invalid prune plan, or a plan file that does not match the model."""


class PrunePlan(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    num_layers: int
    skip_layers: tuple[int, ...] = ()
    independent_kv: bool = True
    boundary_handling: bool = True
    # Optional provenance: the model the plan was made for (checked when loaded from a file).
    model: str | None = None

    def __init__(self, **data):
        # Surface plan problems as PlanError with one clear line, not pydantic's report.
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise PlanError(format_validation_error(exc)) from None

    @field_validator("skip_layers")
    @classmethod
    def _sorted_unique(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted(set(v)))

    @model_validator(mode="after")
    def _check(self) -> "PrunePlan":
        if self.num_layers < 1:
            raise PlanError(f"num_layers must be >= 1, got {self.num_layers}")
        bad = [l for l in self.skip_layers if not 0 <= l < self.num_layers]
        if bad:
            raise PlanError(f"skip layers {bad} out of range for a model with {self.num_layers} layers (valid: 0..{self.num_layers - 1})")
        if len(self.skip_layers) == self.num_layers:
            raise PlanError(f"a plan may not skip all {self.num_layers} layers")
        return self

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def none(cls, num_layers: int) -> "PrunePlan":
        return cls(num_layers=num_layers)

    @classmethod
    def from_ratio(cls, num_layers: int, ratio: float, **kw) -> "PrunePlan":
        """Skip the deepest ``floor(L * ratio)`` layers."""
        if not 0.0 <= ratio < 1.0:
            raise PlanError(f"prune ratio must be in [0, 1), got {ratio}")
        k = math.floor(num_layers * ratio + 1e-6)
        return cls(num_layers=num_layers, skip_layers=tuple(range(num_layers - k, num_layers)), **kw)

    @classmethod
    def default(cls, num_layers: int, **kw) -> "PrunePlan":
        """The paper's default: the last ``floor(L/3)`` layers."""
        k = num_layers // 3
        return cls(num_layers=num_layers, skip_layers=tuple(range(num_layers - k, num_layers)), **kw)

    @classmethod
    def first_third(cls, num_layers: int, **kw) -> "PrunePlan":
        return cls(num_layers=num_layers, skip_layers=tuple(range(num_layers // 3)), **kw)

    @classmethod
    def every_third(cls, num_layers: int, **kw) -> "PrunePlan":
        return cls(num_layers=num_layers, skip_layers=tuple(l for l in range(num_layers) if l % 3 == 2), **kw)

    @classmethod
    def load(cls, path: str | Path, num_layers: int | None = None) -> "PrunePlan":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PlanError(f"cannot read prune plan {path}: {exc}") from exc
        try:
            plan = cls(**raw)
        except PlanError:
            raise
        except Exception as exc:  # pydantic ValidationError: report the file
            raise PlanError(f"{path}: invalid prune plan: {exc}") from exc
        if num_layers is not None and plan.num_layers != num_layers:
            raise PlanError(f"{path}: plan is for a {plan.num_layers}-layer model, this model has {num_layers} layers" + (f" (plan made for {plan.model})" if plan.model else ""))
        return plan

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.model_dump(), indent=2) + "\n")

    # ---- derived ------------------------------------------------------------------------------
    @property
    def is_empty(self) -> bool:
        return not self.skip_layers

    @property
    def ratio(self) -> float:
        return len(self.skip_layers) / self.num_layers

    @property
    def kept_layers(self) -> tuple[int, ...]:
        skip = set(self.skip_layers)
        return tuple(l for l in range(self.num_layers) if l not in skip)

    @property
    def skipped_runs(self) -> tuple[tuple[int, ...], ...]:
        """Maximal runs of consecutive skipped layers; each shares one hidden state (see decoder)."""
        runs: list[list[int]] = []
        for l in self.skip_layers:
            if runs and runs[-1][-1] == l - 1:
                runs[-1].append(l)
            else:
                runs.append([l])
        return tuple(tuple(r) for r in runs)

    def describe(self) -> str:
        if self.is_empty:
            return "full prefill (no layers skipped)"
        runs = ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in self.skipped_runs)
        extras = "" if self.independent_kv and self.boundary_handling else f" [ablation: independent_kv={self.independent_kv}, boundary_handling={self.boundary_handling}]"
        return f"POP: skip {len(self.skip_layers)}/{self.num_layers} layers in prefill ({runs}){extras}"
