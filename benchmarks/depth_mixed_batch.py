"""Mixed-plan prefill steps: what splitting a step into one pass per plan costs.

The prefill worker runs a step whose tasks ask for different plans of the family as one forward
pass per plan (``PrefillWorker.step``), on the family's one prefill-only instance. The
alternative, one step per plan (the other plans' tasks wait for later steps), runs exactly the
same forward passes in a different order, so its compute is the same; what could be lost is batch
efficiency, since each pass is smaller than the step. This script measures that on the real model
with the CPU clock: ``B`` prompts of ``N`` tokens, plans assigned round-robin over the family,

* grouped:  one pass per plan over its share of the prompts (what the worker does);
* per plan: the same prompts all at one plan in one pass, for each plan; the grouped step's
  "unsplit" cost is the mean of these (each plan holds 1/P of the tokens).

grouped / unsplit is the price of splitting. K/V go to a no-op sink (the transport is not part of
the question).

    python benchmarks/depth_mixed_batch.py --batch 8 --len 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pop_disagg.models.attention import PrefillAttention  # noqa: E402
from pop_disagg.models.loader import load_model  # noqa: E402
from pop_disagg.models.registry import resolve_model  # noqa: E402
from pop_disagg.pop.plan import PlanFamily  # noqa: E402


def one_pass(model, prompts, plan) -> float:
    ids, pos, cu = [], [], [0]
    for p in prompts:
        ids += p
        pos += range(len(p))
        cu.append(cu[-1] + len(p))
    t = time.process_time()
    with torch.inference_mode():
        model(torch.tensor(ids), torch.tensor(pos), PrefillAttention(cu, sink=lambda l, k, v: None), plan=plan)
    return time.process_time() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--ratios", default="0,0.2,0.34,0.5")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "depth" / "mixed_batch.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    path = resolve_model(args.model)
    model = load_model(path)
    fam = PlanFamily.from_ratios(model.arch.num_layers, [float(r) for r in args.ratios.split(",")])
    model = load_model(path, prefill_only_plan=fam.union_plan)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.arch.vocab_size, (args.len,), generator=g).tolist() for _ in range(args.batch)]
    share = {i: [q for j, q in enumerate(prompts) if j % len(fam.plans) == i] for i in range(len(fam.plans))}
    one_pass(model, prompts[:2], fam.plans[0])  # warm-up
    grouped, single = [], {i: [] for i in range(len(fam.plans))}
    for _ in range(args.repeats):
        grouped.append(sum(one_pass(model, share[i], plan) for i, plan in enumerate(fam.plans)))
        for i, plan in enumerate(fam.plans):
            single[i].append(one_pass(model, prompts, plan))
    g_med = statistics.median(grouped)
    s_med = {i: statistics.median(v) for i, v in single.items()}
    unsplit = statistics.mean(s_med.values())
    res = {
        "model": args.model,
        "batch": args.batch,
        "len": args.len,
        "ratios": list(fam.ratios),
        "repeats": args.repeats,
        "grouped_cpu_s": g_med,
        "single_plan_cpu_s": {fam.names[i]: s for i, s in s_med.items()},
        "unsplit_cpu_s": unsplit,
        "grouped_over_unsplit": g_med / unsplit,
        "torch_threads": 1,
        "clock": "process_time",
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
