"""Results files and printed tables.

One JSON file per run (``RESULTS_FORMAT`` names its layout): the settings, the protocol
(``backend``), the server's health and model info (its configuration: topology, prefill, plan), the
summary from ``metrics.summarize``, the same metrics under vLLM's flat names (``completed``,
``mean_ttft_ms``, ``p99_tpot_ms``, ...) and every per-request record, server-reported timings included. ``load_result`` reads one back and
recomputes nothing; ``plot`` and the tests read these files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

RESULTS_FORMAT = "pop-disagg-bench-serve/1"


def config_label(model_info: dict) -> str:
    """The server configuration a run measured, e.g. ``disaggregated/pop``."""
    return f"{model_info.get('topology') or '?'}/{model_info.get('prefill') or '?'}"


def build_result(
    *,
    label: str,
    target: str,
    settings: dict,
    workload: dict,
    health: dict,
    model_info: dict,
    summary: dict,
    records: list,
    started_at: float,
    is_interrupted: bool,
    backend: str = "grpc",
    vllm: dict | None = None,
) -> dict:
    """``vllm``: the flat keys of ``metrics.vllm_metrics``, written at the top level as vLLM does."""
    return {
        "format": RESULTS_FORMAT,
        "label": label,
        "backend": backend,
        "started_at": started_at,
        "is_interrupted": is_interrupted,
        "settings": settings,
        "workload": workload,
        "server": {"target": target, "health": health, "model_info": model_info},
        "summary": summary,
        **(vllm or {}),
        "requests": [r.to_json() for r in records],
    }


def write_result(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # inf rates are legal settings; JSON has no inf, so they are written as the string "inf".
    path.write_text(json.dumps(_finite(result), indent=1) + "\n")
    return path


def load_result(path: str | Path) -> dict:
    result = json.loads(Path(path).read_text())
    if result.get("format") != RESULTS_FORMAT:
        raise ValueError(f"{path}: not a `pop-disagg bench serve` results file (format {result.get('format')!r})")
    return result


def rate_of(result: dict) -> float:
    return float(result["settings"]["request_rate"])  # "inf" parses as inf


def sweep_path(output: str | Path, rate: float) -> Path:
    """``out.json`` -> ``out-rate2.json`` for one rate of a sweep."""
    output = Path(output)
    return output.with_name(f"{output.stem}-rate{rate:g}{output.suffix or '.json'}")


def _finite(x):
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


# ---- tables --------------------------------------------------------------------------------------
def _fmt(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_summary(result: dict) -> str:
    s, st = result["summary"], result["settings"]
    head = f" {result['label']} | {result['server']['model_info'].get('model', '?')} | rate {st['request_rate']} req/s "
    lines = [f"{head:=^72}"]
    rows = [
        ("Requests completed / sent", f"{s['num_completed']} / {s['num_requests']}"),
        ("Requests failed", f"{s['num_failed']}" + (f"  {s['failures']}" if s["failures"] else "")),
        ("Duration (s)", _fmt(s["duration_s"], 2)),
        ("Input / output tokens", f"{s['total_input_tokens']} / {s['total_output_tokens']}"),
        ("Request throughput (req/s)", _fmt(s["request_throughput"], 3)),
        ("Output token throughput (tok/s)", _fmt(s["output_throughput"], 2)),
        ("Total token throughput (tok/s)", _fmt(s["total_token_throughput"], 2)),
    ]
    if "goodput" in s:
        rows.append(("SLOs (ms)", " ".join(f"{k}<={v:g}" for k, v in s["slos_ms"].items())))
        rows.append(
            ("Goodput (req/s)", f"{s['goodput']:.3f}  ({100 * s['slo_attainment']:.0f}% of requests met every SLO)")
        )
    lines += [f"{k:<40}{v}" for k, v in rows]
    lines.append(f"{'(ms)':<10}{'mean':>12}{'median':>12}{'p90':>12}{'p99':>12}")
    for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E", "e2el_ms")):
        m = s[key]
        lines.append(f"{name:<10}" + "".join(f"{_fmt(m[q]):>12}" for q in ("mean", "median", "p90", "p99")))
    if result.get("is_interrupted"):
        lines.append("(interrupted: requests still in flight were cancelled and count as failed)")
    lines.append("=" * 72)
    return "\n".join(lines)


def format_sweep_table(results: list[dict], markdown: bool = False) -> str:
    """One row per (configuration, rate): TTFT / TPOT p50 and p99, goodput, completed / failed."""
    header = [
        "config",
        "rate (req/s)",
        "TTFT p50 (ms)",
        "TTFT p99 (ms)",
        "TPOT p50 (ms)",
        "TPOT p99 (ms)",
        "goodput (req/s)",
        "SLO met",
        "done/failed",
    ]
    rows = []
    for r in sorted(results, key=lambda r: (r["label"], rate_of(r))):
        s = r["summary"]
        rows.append(
            [
                r["label"],
                f"{rate_of(r):g}",
                _fmt(s["ttft_ms"]["median"]),
                _fmt(s["ttft_ms"]["p99"]),
                _fmt(s["tpot_ms"]["median"]),
                _fmt(s["tpot_ms"]["p99"]),
                _fmt(s.get("goodput"), 3),
                "-" if "slo_attainment" not in s else f"{100 * s['slo_attainment']:.0f}%",
                f"{s['num_completed']}/{s['num_failed']}",
            ]
        )
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(out + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in [header, *rows])
