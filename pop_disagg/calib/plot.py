"""The paper's Figure 1 for one profile: per-layer importance in prefill and decode."""

from __future__ import annotations

from pathlib import Path

from .importance import ImportanceProfile


def plot_profile(profile: ImportanceProfile, out: str | Path, log_scale: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    layers = list(range(profile.num_layers))
    fig, ax = plt.subplots(figsize=(8, 4.2))
    # Colours as in the paper: prefill blue, decode orange.
    ax.plot(layers, profile.prefill, marker="o", markersize=3, color="tab:blue", label="prefill")
    ax.plot(layers, profile.decode, marker="o", markersize=3, color="tab:orange", label="decode")
    if log_scale:
        ax.set_yscale("log", nonpositive="mask")  # exact zeros cannot be drawn: name them instead
        zeros = [
            f"{stage} {l}"
            for stage, values in (("prefill", profile.prefill), ("decode", profile.decode))
            for l, v in enumerate(values)
            if v == 0.0
        ]
        if zeros:
            ax.text(
                0.99,
                0.02,
                "exactly 0 (not drawn): " + ", ".join(zeros),
                transform=ax.transAxes,
                ha="right",
                va="bottom",
                fontsize=8,
            )
    ax.set_xlabel("layer")
    ax.set_ylabel("importance  E[(dL/dg)^2]")
    s = profile.settings
    ax.set_title(f"{Path(profile.model).name}: stage-aware layer importance ({s.num_samples} samples)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
