"""The K/V refit comparison table (benchmarks/results/kv_refit/README.md) from the results of
``benchmarks/kv_refit_study.sh``: one row per variant, with the data each needed and what it bought.

Usage: python benchmarks/kv_refit_table.py benchmarks/results/kv_refit/*.json
"""

from __future__ import annotations

import json
import sys


def _saving(res: dict, method: str, num_skipped: int) -> float:
    """Prefill FLOPs saved: the ``state`` method adds one hidden x hidden GEMM per skipped layer."""
    from pop_disagg.eval.static_prune import kv_fraction
    from pop_disagg.models.arch import ModelArch

    arch = ModelArch.from_pretrained(res["model_path"])
    prompt_len = res["config"]["prompt_len"]
    kept = kv_fraction(arch, prompt_len)
    if method == "state":
        kv_flops = 2 * arch.hidden_size * 2 * arch.kv_size
        kept *= (kv_flops + 2 * arch.hidden_size**2) / kv_flops
    return num_skipped * (1.0 - kept) / arch.num_layers


def rows(res: dict) -> list[list[str]]:
    methods = {m["name"]: m for m in res["methods"]}
    pop = methods["pop-33%"]
    out = [
        [
            res["model"],
            "POP, no refit",
            "-",
            "-",
            "-",
            f"{pop['ppl_ratio']:.3f}",
            "0%",
            f"{pop['kl_first']:.3f}",
            f"{100 * pop['prefill_flops_saving']:.1f}%",
        ]
    ]
    for name, fit in res["kv_correction"].items():
        m = methods[name]
        closed = (pop["ppl_ratio"] - m["ppl_ratio"]) / (pop["ppl_ratio"] - 1.0)
        sources = "+".join({"britannica": "prose", "sharegpt": "chat"}[s] for s in fit["calibration_sources"])
        variant = name.partition("+kvfit")[2][1:] or f"{fit['method']} (default)"
        out.append(
            [
                "",
                variant,
                fit["method"],
                f"{fit['num_calibration_tokens']} {sources}",
                f"{fit['fit_seconds']:.0f}",
                f"{m['ppl_ratio']:.3f}",
                f"{100 * closed:.0f}%",
                f"{m['kl_first']:.3f}",
                f"{100 * _saving(res, fit['method'], m['num_skipped']):.1f}%",
            ]
        )
    return out


def main(paths: list[str]) -> None:
    head = [
        "model",
        "variant",
        "fit",
        "calibration tokens",
        "fit s",
        "ppl / full",
        "excess closed",
        "KL first token",
        "prefill FLOPs saved",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for p in paths:
        res = json.loads(open(p).read())
        for r in rows(res):
            print("| " + " | ".join(r) + " |")
        d = res["data"]
        print(
            f"\n{res['model']}: {d['num_texts']} held-out texts, {res['timings_s']['total']:.0f} s in all ({res['hardware']})\n",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
