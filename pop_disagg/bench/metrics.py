"""Per-request records and the serving metrics computed from them, as vLLM's ``bench serve`` defines them.

For one successful request (times measured by the client from the moment it sent the request):

* **TTFT**: until the first streamed chunk that carries a token.
* **E2E latency**: until the stream ended (the last message, with the finish reason, arrived).
* **TPOT**: ``(e2e - ttft) / (output_tokens - 1)``; undefined for one-token outputs, which are
  left out of the TPOT statistics and meet any TPOT SLO.
* **ITL**: the gaps between consecutive token-bearing chunks. A chunk of ``k`` tokens counts its
  gap as ``k`` gaps of ``gap / k``, so a server that batches its stream is not rewarded with fewer,
  longer gaps; extra tokens in the first chunk arrive with the first token and add no gap.

Across a run: means, medians and percentiles are over successful requests (ITL over all their
gaps); throughputs divide by the run's duration (first send to last completion). **Goodput**
(DistServe) is completed requests per second that met every SLO (``--slo ttft:MS tpot:MS e2el:MS``);
``slo_attainment`` is the same count over every request sent, failures included.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)
SLO_KEYS = ("ttft", "tpot", "e2el")


@dataclass
class RequestRecord:
    """Everything the client saw of one request. Times in seconds."""

    index: int
    num_prompt_tokens: int | None  # known before sending (None: text only the server tokenizes)
    max_new_tokens: int
    scheduled_s: float = 0.0  # planned send time, from the start of the run
    send_s: float = 0.0  # actual send time (later than planned when --max-concurrency held it back)
    chunk_times_s: list[float] = field(default_factory=list)  # since send, one per token-bearing chunk
    chunk_num_tokens: list[int] = field(default_factory=list)
    end_s: float | None = None  # since send, when the stream ended
    request_id: str = ""
    finish_reason: str | None = None  # stop | length (abort counts as a failure)
    error: str | None = None  # "<gRPC code>: <details>", "timeout", "cancelled", ...
    usage_prompt_tokens: int | None = None  # what the server reported
    usage_completion_tokens: int | None = None
    server_timings: dict | None = None  # queue_s, prefill_s, transfer_s, ttft_s, decode_s (router clock)

    @property
    def is_success(self) -> bool:
        return self.error is None and self.end_s is not None and self.num_output_tokens > 0

    @property
    def num_output_tokens(self) -> int:
        return sum(self.chunk_num_tokens)

    @property
    def num_input_tokens(self) -> int:
        if self.usage_prompt_tokens is not None:
            return self.usage_prompt_tokens
        return self.num_prompt_tokens or 0

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times_s[0] if self.chunk_times_s else None

    @property
    def e2e_s(self) -> float | None:
        return self.end_s

    @property
    def tpot_s(self) -> float | None:
        if not self.is_success or self.num_output_tokens < 2:
            return None
        return (self.end_s - self.ttft_s) / (self.num_output_tokens - 1)

    @property
    def itls_s(self) -> list[float]:
        out: list[float] = []
        for prev, now, k in zip(self.chunk_times_s, self.chunk_times_s[1:], self.chunk_num_tokens[1:]):
            out += [(now - prev) / k] * k
        return out

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(
            is_success=self.is_success,
            num_output_tokens=self.num_output_tokens,
            ttft_s=self.ttft_s,
            tpot_s=self.tpot_s,
            e2e_s=self.e2e_s,
        )
        return d

    @classmethod
    def from_json(cls, d: dict) -> "RequestRecord":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# ---- SLOs ----------------------------------------------------------------------------------------
def parse_slos(items: list[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        try:
            ms = float(value)
        except ValueError:
            ms = float("nan")
        if not sep or key not in SLO_KEYS or not ms > 0:
            raise ValueError(f"--slo {item!r}: expected KEY:MS with KEY one of {', '.join(SLO_KEYS)} and MS > 0")
        slos[key] = ms
    return slos


def meets_slos(r: RequestRecord, slos: dict[str, float]) -> bool:
    if not r.is_success:
        return False
    values_ms = {"ttft": r.ttft_s * 1e3, "e2el": r.e2e_s * 1e3, "tpot": None if r.tpot_s is None else r.tpot_s * 1e3}
    return all(values_ms[k] is None or values_ms[k] <= limit for k, limit in slos.items())


# ---- summary -------------------------------------------------------------------------------------
def stats_ms(values_s: list[float]) -> dict[str, float | None]:
    """mean, std, median, p90, p99 in milliseconds (numpy's linear-interpolation percentiles)."""
    if not values_s:
        return {"mean": None, "std": None, "median": None, **{f"p{p}": None for p in PERCENTILES}}
    x = np.asarray(values_s, dtype=np.float64) * 1e3
    return {
        "mean": float(x.mean()),
        "std": float(x.std()),
        "median": float(np.median(x)),
        **{f"p{p}": float(np.percentile(x, p)) for p in PERCENTILES},
    }


def summarize(records: list[RequestRecord], duration_s: float, slos: dict[str, float] | None = None) -> dict:
    ok = [r for r in records if r.is_success]
    failed = [r for r in records if not r.is_success]
    num_in = sum(r.num_input_tokens for r in ok)
    num_out = sum(r.num_output_tokens for r in ok)
    per_s = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: 0.0)
    summary = {
        "num_requests": len(records),
        "num_completed": len(ok),
        "num_failed": len(failed),
        "failures": dict(Counter((r.error or "no tokens").split(":")[0] for r in failed)),
        "duration_s": duration_s,
        "total_input_tokens": num_in,
        "total_output_tokens": num_out,
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(num_out),
        "total_token_throughput": per_s(num_in + num_out),
        "ttft_ms": stats_ms([r.ttft_s for r in ok]),
        "tpot_ms": stats_ms([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_ms": stats_ms([g for r in ok for g in r.itls_s]),
        "e2el_ms": stats_ms([r.e2e_s for r in ok]),
        "slos_ms": dict(slos or {}),
    }
    if slos:
        num_good = sum(meets_slos(r, slos) for r in ok)
        summary.update(
            num_good=num_good, goodput=per_s(num_good), slo_attainment=num_good / len(records) if records else 0.0
        )
    return summary


# ---- vLLM's names --------------------------------------------------------------------------------
VLLM_PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")


def parse_percentile_options(metrics: str, percentiles: str) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """``--percentile-metrics ttft,tpot,itl`` and ``--metric-percentiles 50,99``, checked."""
    names = tuple(m.strip() for m in metrics.split(",") if m.strip())
    bad = [m for m in names if m not in VLLM_PERCENTILE_METRICS]
    if bad:
        raise ValueError(
            f"--percentile-metrics {metrics!r}: {', '.join(bad)} not among {', '.join(VLLM_PERCENTILE_METRICS)}"
        )
    try:
        ps = tuple(float(p) for p in percentiles.split(",") if p.strip())
    except ValueError:
        ps = (-1.0,)
    if not ps or not all(0 < p <= 100 for p in ps):
        raise ValueError(f"--metric-percentiles {percentiles!r}: expected comma-separated numbers in (0, 100]")
    return names, ps


def vllm_metrics(
    records: list[RequestRecord],
    summary: dict,
    metrics: tuple[str, ...] = ("ttft", "tpot", "itl"),
    percentiles: tuple[float, ...] = (99.0,),
) -> dict:
    """The flat metric keys ``vllm bench serve --save-result`` writes (``completed``, ``mean_ttft_ms``,
    ``p99_itl_ms``, ...), from the same records and definitions as ``summarize``."""
    ok = [r for r in records if r.is_success]
    values = {
        "ttft": [r.ttft_s for r in ok],
        "tpot": [r.tpot_s for r in ok if r.tpot_s is not None],
        "itl": [g for r in ok for g in r.itls_s],
        "e2el": [r.e2e_s for r in ok],
    }
    out = {"duration": summary["duration_s"], "completed": summary["num_completed"], "failed": summary["num_failed"]}
    out.update(
        {
            k: summary[k]
            for k in (
                "total_input_tokens",
                "total_output_tokens",
                "request_throughput",
                "output_throughput",
                "total_token_throughput",
            )
        }
    )
    if "goodput" in summary:
        out["request_goodput"] = summary["goodput"]
    for name in metrics:
        x = np.asarray(values[name], dtype=np.float64) * 1e3
        out[f"mean_{name}_ms"] = float(x.mean()) if x.size else None
        out[f"median_{name}_ms"] = float(np.median(x)) if x.size else None
        out[f"std_{name}_ms"] = float(x.std()) if x.size else None
        for p in percentiles:
            word = str(int(p)) if p == int(p) else str(p)  # vLLM's spelling: p99, p99.9
            out[f"p{word}_{name}_ms"] = float(np.percentile(x, p)) if x.size else None
    return out
