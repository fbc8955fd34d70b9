"""Fidelity results as a Markdown table and PNG plots (quality vs prune ratio; per-layer curves)."""

from __future__ import annotations

from pathlib import Path

GROUP_TITLES = {
    "full": "reference",
    "pop": "POP",
    "ablation": "ablations (paper Table 3)",
    "static": "static pruning (ShortGPT-style)",
    "corrected": "POP + least-squares K/V (ours)",
}


def _fmt(x, digits=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def markdown_table(results: dict) -> str:
    """One row per method; quality columns relative to the full model."""
    tasks = list(results["data"]["tasks"])
    head = [
        "method",
        "skipped",
        "prefill FLOPs saved",
        "ppl",
        "ppl / full",
        "KL first tok",
        "top-1 agree (TF)",
        "greedy agree@32",
        "greedy prefix",
        "MC acc",
        "MC agree w/ full",
    ]
    head += [f"{t} acc" for t in tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in results["methods"]:
        row = [
            f"`{m['name']}`",
            str(m["num_skipped"]),
            f"{100 * m['prefill_flops_saving']:.1f}%",
            _fmt(m["ppl"], 2),
            _fmt(m.get("ppl_ratio", 1.0)),
            _fmt(m.get("kl_first", 0.0), 4),
            _fmt(m.get("top1_tf", 1.0)),
            _fmt(m.get("greedy_agree", 1.0)),
            _fmt(m.get("greedy_prefix", float(results["config"]["greedy_len"])), 1),
            _fmt(m.get("mc_acc")),
            _fmt(m.get("mc_agree", 1.0 if m.get("mc_acc") is not None else None)),
        ]
        row += [_fmt(m["mc"][t]["acc"]) for t in tasks]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _data_line(cfg: dict, data: dict) -> str:
    """What the measures were taken on: texts, or a vision-language model's image prompts."""
    sources = ", ".join(data["sources"])
    if "num_images" not in data:
        return (
            f"{data['num_texts']} texts ({sources}), prompt {cfg['prompt_len']} + continuation "
            f"{cfg['continuation_len']} tokens"
        )
    lo, hi = data["prompt_tokens"]
    return (
        f"{data['num_texts']} image prompts ({sources}; {data['num_images']} images, "
        f"{data['num_image_tokens']} image tokens), prompts of {lo}-{hi} tokens + continuation "
        f"{cfg['continuation_len']} tokens"
    )


def markdown_report(results: dict) -> str:
    cfg, data, arch = results["config"], results["data"], results["arch"]
    parts = [
        f"# Fidelity: {results['model']} ({arch['family']}, {arch['num_layers']} layers)",
        "",
        _data_line(cfg, data)
        + f"; greedy agreement over {cfg['greedy_len']} tokens; BIG-bench "
        + (", ".join(f"{k} ({v})" for k, v in data["tasks"].items()) or "none")
        + f"; calibration (Block Influence, K/V fit) {data['num_calib_tokens']} tokens from a disjoint split. "
        f"Total {results['timings_s']['total']:.0f} s on {results['hardware']}.",
        "",
        markdown_table(results),
        "",
        "Methods: " + "; ".join(f"`{m['name']}`: {m['note']}" for m in results["methods"] if m.get("note")),
    ]
    left_out = results.get("left_out", [])
    parts += ["", "Measures left out:" + (" none." if not left_out else "")]
    parts += [f"- {x['measure']}: {x['reason']}" for x in left_out]
    if results.get("kv_correction"):
        parts += [
            "",
            "K/V fit on calibration data (unexplained energy of the fitted target, POP's map -> fitted, mean over skipped layers):",
        ]
        for name, c in results["kv_correction"].items():
            res = list(c["residuals"].values())
            fits = ", ".join(
                f"{key} {sum(r[key][0] for r in res) / len(res):.3f} -> {sum(r[key][1] for r in res) / len(res):.3f}"
                for key in res[0]
            )
            how = f"{c.get('method', 'kv')}, {c['num_calibration_tokens']} tokens"
            if "fit_seconds" in c:
                how += f", {c['fit_seconds']:.0f} s"
            parts.append(f"- `{name}`: {fits} ({how})")
    sims = results["layers"]["kv_similarity"]
    if sims:
        parts += ["", "Mean K/V cosine similarity with the full model over the skipped layers (eval prompts):"]
        for name, s in sims.items():
            skip = next(m["skip_layers"] for m in results["methods"] if m["name"] == name)
            if skip:
                k = sum(s["k"][l] for l in skip) / len(skip)
                v = sum(s["v"][l] for l in skip) / len(skip)
                vmin = min(s["v"][l] for l in skip)
                parts.append(f"- `{name}`: K {k:.3f}, V {v:.3f} (min V {vmin:.3f})")
    return "\n".join(parts) + "\n"


def plot_quality_vs_ratio(results: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = results["arch"]["num_layers"]
    methods = results["methods"]
    series = {
        "POP": [m for m in methods if m["group"] == "pop" and m["name"] != "pop-plan"],
        "POP + K/V fit": [m for m in methods if m["group"] == "corrected"],
        "static (BI, matched FLOPs)": [m for m in methods if m["name"].startswith("static-bi")],
        "static (POP's layers)": [m for m in methods if m["name"].startswith("static-same")],
    }
    panels = [
        ("ppl_ratio", "perplexity / full (log)", True),
        ("kl_first", "KL of first token (nats, log)", True),
        ("greedy_agree", "greedy agreement @32", False),
        ("mc_agree", "MC agreement with full", False),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    markers = {"POP": "o-", "POP + K/V fit": "s--", "static (BI, matched FLOPs)": "x", "static (POP's layers)": "^"}
    for ax, (key, label, log) in zip(axes, panels):
        for name, ms in series.items():
            pts = sorted((m["num_skipped"] / L, m[key]) for m in ms if m.get(key) is not None)
            if pts:
                ax.plot(
                    [p[0] * 100 for p in pts],
                    [max(p[1], 1e-6) if log else p[1] for p in pts],
                    markers[name],
                    label=name,
                )
        for m in methods:
            if m["group"] == "ablation" and m.get(key) is not None:
                ax.scatter(
                    [m["num_skipped"] / L * 100], [max(m[key], 1e-6) if log else m[key]], marker="d", color="grey"
                )
                ax.annotate(
                    m["name"].removeprefix("abl-"),
                    (m["num_skipped"] / L * 100, max(m[key], 1e-6) if log else m[key]),
                    fontsize=7,
                    color="grey",
                )
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("layers skipped in prefill (%)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{results['model']}: quality vs prune ratio (grey: ablations)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_layer_curves(results: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = results["layers"]
    L = results["arch"]["num_layers"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for name, s in layers["kv_similarity"].items():
        style = "--" if name.endswith("+kvfit") else "-"
        axes[0].plot(range(L), s["k"], style, label=name)
        axes[1].plot(range(L), s["v"], style, label=name)
    for ax, what in zip(axes[:2], ("keys", "values")):
        ax.set_title(f"cosine similarity of prompt {what} with the full model", fontsize=10)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[2].bar(range(L), layers["block_influence"], color="tab:purple")
    axes[2].set_title("ShortGPT Block Influence (1 - cos(h_in, h_out))", fontsize=10)
    axes[2].set_xlabel("layer")
    fig.suptitle(f"{results['model']}: per-layer curves", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
