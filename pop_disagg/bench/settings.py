"""How a benchmark run sends its requests (``RunSettings``), and the one error a run starts with."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .arrivals import check_arrival_settings


class ServerUnreachable(RuntimeError):
    """No healthy server answers at the target."""


class RunSettings(BaseModel):
    """How one run sends its requests."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    request_rate: float = Field(float("inf"), description="requests per second; inf sends all at once")
    burstiness: float = Field(1.0, description="gamma shape of the gaps; 1 = Poisson")
    max_concurrency: int | None = Field(None, ge=1, description="requests in flight at most")
    num_requests: int | None = Field(None, ge=1)
    duration_s: float | None = Field(None, gt=0, description="stop sending once the schedule passes this")
    num_warmup: int = Field(1, ge=0)
    seed: int = 0
    ignore_eos: bool = False
    temperature: float = Field(0.0, ge=0)
    request_timeout_s: float | None = Field(None, gt=0)
    prune_ratio: float | None = Field(None, description="ask every request for this plan of the served family")

    @model_validator(mode="after")
    def _check(self) -> "RunSettings":
        check_arrival_settings(self.request_rate, self.burstiness)
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("set num_requests, duration_s or both")
        return self
