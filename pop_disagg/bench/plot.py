"""``bench plot``: TTFT and TPOT percentiles and goodput against request rate, one line per configuration.

One PNG with three panels. Lines are grouped by each result's ``label`` (the server configuration,
e.g. ``disaggregated/pop``); p50 is solid and p99 dashed in the same colour. A rate of ``inf`` is
drawn one step to the right of the largest finite rate and labelled ``inf``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from .report import rate_of


def plot_sweeps(results: list[dict], out: str | Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("no results to plot")
    finite = sorted({rate_of(r) for r in results if math.isfinite(rate_of(r))})
    inf_x = finite[-1] * 2 if finite else 1.0
    x_of = lambda rate: rate if math.isfinite(rate) else inf_x  # noqa: E731
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        by_label[r["label"]].append(r)

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    has_goodput = any("goodput" in r["summary"] for r in results)
    for color, (label, runs) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4, sorted(by_label.items())):
        runs = sorted(runs, key=rate_of)
        xs = [x_of(rate_of(r)) for r in runs]
        for ax, key in ((axes[0], "ttft_ms"), (axes[1], "tpot_ms")):
            for q, style in (("median", "-"), ("p99", "--")):
                ys = [r["summary"][key][q] for r in runs]
                ax.plot(
                    xs,
                    [float("nan") if y is None else y for y in ys],
                    style,
                    marker="o",
                    color=color,
                    label=f"{label} {'p50' if q == 'median' else q}",
                )
        if has_goodput:
            axes[2].plot(
                xs, [r["summary"].get("goodput", float("nan")) for r in runs], "-", marker="o", color=color, label=label
            )
        else:
            axes[2].plot(
                xs, [r["summary"]["request_throughput"] for r in runs], "-", marker="o", color=color, label=label
            )

    slos = next((r["summary"].get("slos_ms") for r in results if r["summary"].get("slos_ms")), {})
    slo_text = " ".join(f"{k}<={v:g}ms" for k, v in slos.items())
    panels = (
        ("TTFT (ms)", "TTFT p50 / p99"),
        ("TPOT (ms)", "TPOT p50 / p99"),
        (
            "goodput (req/s)" if has_goodput else "throughput (req/s)",
            f"goodput [{slo_text}]" if has_goodput else "completed requests / s",
        ),
    )
    has_inf = any(not math.isfinite(rate_of(r)) for r in results)
    ticks, tick_labels = (
        finite + ([inf_x] if has_inf else []),
        [f"{t:g}" for t in finite] + (["inf"] if has_inf else []),
    )
    for ax, (ylabel, name) in zip(axes, panels):
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(ylabel)
        ax.set_title(name)
        ax.set_xticks(ticks, tick_labels)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if finite:
        axes[2].plot(finite, finite, ":", color="grey", label="offered rate")
        axes[2].legend(fontsize=7)
    model = results[0]["server"]["model_info"].get("model", "")
    fig.suptitle(title or f"pop-disagg bench serve: {model}")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
