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


_WRONG_KIND = {
    "PrunePlan": "a plan family, not a single plan (serve it with `serve --prune-plan`)",
    "PlanFamily": "not a plan family (no 'plans' list); a single plan goes to --prune-plan of generate",
}


def read_plan_file(
    path: str | Path, num_layers: int | None = None, expect: type | None = None
) -> "PrunePlan | PlanFamily":
    """The one reader of plan JSON: a file with a ``plans`` list is a :class:`PlanFamily`, any
    other a :class:`PrunePlan`. ``num_layers`` (the model's depth) refuses a file made for another
    model, naming both; ``expect`` refuses the other kind."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanError(f"cannot read plan file {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise PlanError(f"{path}: a plan file holds a JSON object, got {type(raw).__name__}")
    try:
        if "plans" in raw:
            what, obj = "family", PlanFamily(**{**raw, "plans": tuple(PrunePlan(**p) for p in raw["plans"])})
        else:
            what, obj = "plan", PrunePlan(**raw)
    except (PlanError, TypeError) as exc:
        raise PlanError(f"{path}: invalid plan file: {exc}") from None
    if expect is not None and not isinstance(obj, expect):
        raise PlanError(f"{path}: {_WRONG_KIND[expect.__name__]}")
    _check_num_layers(path, what, obj.num_layers, num_layers, obj.model)
    return obj


def write_plan_file(obj: "PrunePlan | PlanFamily", path: str | Path) -> None:
    """The one writer: what :func:`read_plan_file` reads back equal."""
    Path(path).write_text(json.dumps(obj.model_dump(), indent=2) + "\n")


def _check_num_layers(path: Path, what: str, have: int, want: int | None, model: str | None) -> None:
    """A plan (or family) file made for another depth of model is refused naming both."""
    if want is not None and have != want:
        raise PlanError(
            f"{path}: {what} is for a {have}-layer model, this model has {want} layers"
            + (f" ({what} made for {model})" if model else "")
        )


class _PlanFile:
    """What a plan and a family share: problems surface as PlanError with one clear line (not
    pydantic's report), and ``load`` / ``save`` go through the one reader and writer."""

    def __init__(self, **data):
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise PlanError(format_validation_error(exc)) from None

    @classmethod
    def load(cls, path: str | Path, num_layers: int | None = None):
        return read_plan_file(path, num_layers, expect=cls)

    def save(self, path: str | Path) -> None:
        write_plan_file(self, path)


class PrunePlan(_PlanFile, BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    num_layers: int
    skip_layers: tuple[int, ...] = ()
    independent_kv: bool = True
    boundary_handling: bool = True
    # Optional provenance: the model the plan was made for (checked when loaded from a file).
    model: str | None = None

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
            raise PlanError(
                f"skip layers {bad} out of range for a model with {self.num_layers} layers (valid: 0..{self.num_layers - 1})"
            )
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
        extras = (
            ""
            if self.independent_kv and self.boundary_handling
            else f" [ablation: independent_kv={self.independent_kv}, boundary_handling={self.boundary_handling}]"
        )
        return f"POP: skip {len(self.skip_layers)}/{self.num_layers} layers in prefill ({runs}){extras}"


def _ratio_name(ratio: float) -> str:
    return f"{ratio:g}"


class PlanFamily(_PlanFile, BaseModel):
    """Nested plans one prefill worker can serve (``serve --prune-ratios`` / a family JSON).

    ``ratios[i]`` is the nominal ratio clients ask for and ``plans[i]`` the plan it names; both are
    ordered mildest first and each plan's skip set contains the milder one's. So the prefill-only
    instance built for the mildest plan (``union_plan``) holds every weight any member needs: the
    layers deeper plans skip are kept layers of the mildest one, whose K/V projections it has, and
    a deeper plan runs on it by projecting those layers' K/V from the last kept layer's output.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    ratios: tuple[float, ...]
    plans: tuple[PrunePlan, ...]
    default_ratio: float
    strategy: str = "last"
    model: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "PlanFamily":
        if not self.plans or len(self.plans) != len(self.ratios):
            raise PlanError(
                f"a plan family needs one plan per ratio, got {len(self.ratios)} ratios and {len(self.plans)} plans"
            )
        if len({p.num_layers for p in self.plans}) != 1:
            raise PlanError("every plan of a family must be for the same number of layers")
        if list(self.ratios) != sorted(self.ratios) or len(set(self.ratios)) != len(self.ratios):
            raise PlanError(f"family ratios must be distinct and ordered mildest first, got {list(self.ratios)}")
        for (r0, milder), (r1, deeper) in zip(zip(self.ratios, self.plans), zip(self.ratios[1:], self.plans[1:])):
            if not set(milder.skip_layers) < set(deeper.skip_layers):
                raise PlanError(
                    f"plans are not nested: ratio {r1:g} skips {list(deeper.skip_layers)}, which must strictly contain "
                    f"ratio {r0:g}'s {list(milder.skip_layers)} (two ratios giving the same plan on {milder.num_layers} layers?)"
                )
        if not any(abs(r - self.default_ratio) < 1e-9 for r in self.ratios):
            raise PlanError(f"default ratio {self.default_ratio:g} is not one of the family's {self.names}")
        if len(self.plans) > 1 and any(not p.independent_kv or not p.boundary_handling for p in self.plans):
            raise PlanError("family plans cannot be ablations (they need independent_kv and boundary_handling)")
        return self

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def build(cls, ratios: list[float], make_plan, default_ratio: float | None = None, **kw) -> "PlanFamily":
        """``make_plan(ratio) -> PrunePlan``; ``default_ratio`` defaults to the first ratio given."""
        default = ratios[0] if default_ratio is None else default_ratio
        ordered = sorted(ratios)
        return cls(ratios=tuple(ordered), plans=tuple(make_plan(r) for r in ordered), default_ratio=default, **kw)

    @classmethod
    def from_ratios(cls, num_layers: int, ratios: list[float], **kw) -> "PlanFamily":
        """Last-layers family (the POP default, at several depths): ratio r skips the deepest floor(L*r)."""
        return cls.build(ratios, lambda r: PrunePlan.from_ratio(num_layers, r), strategy="last", **kw)

    # ---- derived ------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.plans[0].num_layers

    @property
    def names(self) -> list[str]:
        return [_ratio_name(r) for r in self.ratios]

    @property
    def union_plan(self) -> PrunePlan:
        """The plan the family's prefill-only instance is built for: the mildest one."""
        return self.plans[0]

    @property
    def default_plan(self) -> PrunePlan:
        return self.plan_for(self.default_ratio)

    def index_of(self, ratio: float, tol: float = 1e-4) -> int | None:
        """The member a requested ratio names (``tol`` absorbs the float32 of the wire), or None."""
        for i, r in enumerate(self.ratios):
            if abs(r - ratio) <= tol:
                return i
        return None

    def plan_for(self, ratio: float) -> PrunePlan:
        i = self.index_of(ratio)
        if i is None:
            raise PlanError(f"prune ratio {ratio:g} is not served; allowed: {', '.join(self.names)}")
        return self.plans[i]

    def describe(self) -> str:
        members = "; ".join(f"{n}: {len(p.skip_layers)}/{p.num_layers} layers" for n, p in zip(self.names, self.plans))
        return f"POP family ({self.strategy}) of {len(self.plans)} plans [{members}], default {_ratio_name(self.default_ratio)}"
