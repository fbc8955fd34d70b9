"""Training-free K/V correction for POP's skipped layers (our extension; not in the paper).

POP computes a skipped layer's keys and values from the hidden state that reaches it in the pruned
pass, ``h`` (paper Sec. 3.2), whereas the full model would compute them from ``h_l``, the state after
the layers in between have run. The paper's Appendix A measures the drift (value cosine similarity
down to 0.46). Before RoPE (and before the per-head k-norm of Qwen3/Gemma-3), K and V are *linear*
in the normalised input, so we can ask for the linear map that best predicts the full model's K/V
from the normalised pruned state:

    W_K' = argmin_W || norm(h) W - K_full ||^2 + lambda ||W||^2,   same for V,

solved in closed form from calibration tokens, ``W = (X^T X + lambda I)^{-1} X^T Y``, one solve per
skipped layer, no gradient descent. ``norm`` is the weight-free RMS normalisation the fused
skipped-run projection already applies (``CausalLM._store_run_kv``); the fitted W absorbs the
layer's norm weight. Targets exclude the projection bias, which is kept.

Using it needs no decoder change for a prefill-only instance (the disaggregated prefill worker):
there a skipped layer's input norm and K/V projection exist only to write K/V, so the correction is
loaded *as* those weights (norm scale set to identity, projections replaced). A monolithic engine,
whose decode needs the original weights of the same layers, would need a hook in the fused
projection; we do not add one.

Stored as ``kv_correction.safetensors`` beside the plan (tensor ``layers.{l}.k_proj.weight`` etc.,
the plan JSON in the metadata).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..models.attention import PrefillAttention
from ..models.decoder import CausalLM
from .plan import PlanError, PrunePlan

FILE_NAME = "kv_correction.safetensors"
# Ridge strength relative to the mean diagonal of X^T X: enough to make the solve well-posed on
# directions calibration never excites, small enough not to bias the fit (1e-4 vs 1e-2 change the
# calibration residual by < 0.1% on SmolLM2).
DEFAULT_RIDGE = 1e-4


@dataclass
class KVCorrection:
    plan: PrunePlan
    weights: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (W_k, W_v), each (kv_size, hidden)
    # layer -> fraction of the target's energy the fit leaves unexplained on calibration data,
    # before (original projection on the pruned state) and after the fit: {"k": (before, after), ...}
    residuals: dict[int, dict[str, tuple[float, float]]] = field(default_factory=dict)
    num_calibration_tokens: int = 0

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        tensors = {}
        for l, (wk, wv) in self.weights.items():
            tensors[f"layers.{l}.k_proj.weight"] = wk.contiguous().float()
            tensors[f"layers.{l}.v_proj.weight"] = wv.contiguous().float()
        meta = {"plan": json.dumps(self.plan.model_dump()), "num_calibration_tokens": str(self.num_calibration_tokens),
                "residuals": json.dumps({str(l): r for l, r in self.residuals.items()})}
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "KVCorrection":
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "plan" not in meta:
                raise PlanError(f"{path}: not a K/V correction file (no plan in its metadata)")
            plan = PrunePlan(**json.loads(meta["plan"]))
            weights = {l: (f.get_tensor(f"layers.{l}.k_proj.weight"), f.get_tensor(f"layers.{l}.v_proj.weight")) for l in plan.skip_layers}
        residuals = {int(l): {k: tuple(v) for k, v in r.items()} for l, r in json.loads(meta.get("residuals", "{}")).items()}
        return cls(plan, weights, residuals, int(meta.get("num_calibration_tokens", 0)))


@torch.inference_mode()
def fit_kv_correction(model: CausalLM, plan: PrunePlan, texts: list[list[int]], ridge: float = DEFAULT_RIDGE) -> KVCorrection:
    """Least-squares K/V projections for ``plan``'s skipped layers from calibration ``texts``."""
    if plan.is_empty:
        raise PlanError("a K/V correction needs a plan that skips layers")
    if model.is_prefill_only:
        raise ValueError("fit the correction on the full model (it needs the skipped layers' full-model K/V)")
    layers = model.model.layers
    run_of = {l: run for run in plan.skipped_runs for l in run}
    hidden = model.arch.hidden_size
    xtx = {run[0]: torch.zeros(hidden, hidden, dtype=torch.float64) for run in plan.skipped_runs}
    xty = {l: [torch.zeros(hidden, model.arch.kv_size, dtype=torch.float64) for _ in range(2)] for l in plan.skip_layers}
    yty = {l: [0.0, 0.0] for l in plan.skip_layers}
    captured: dict[str, torch.Tensor] = {}

    def keep(name):
        def fn(module, args, output):
            captured[name] = output
        return fn

    # The pruned state entering run r is the output of the kept layer before it (or the embedding).
    pruned_hooks = [(layers[run[0] - 1] if run[0] > 0 else model.model.embed_tokens).register_forward_hook(keep(f"x{run[0]}")) for run in plan.skipped_runs]
    full_hooks = []
    for l in plan.skip_layers:
        full_hooks.append(layers[l].self_attn.k_proj.register_forward_hook(keep(f"k{l}")))
        full_hooks.append(layers[l].self_attn.v_proj.register_forward_hook(keep(f"v{l}")))
    num_tokens = 0
    try:
        for ids in texts:
            n = len(ids)
            x_ids, pos = torch.tensor(ids, device=model.device), torch.arange(n, device=model.device)
            captured.clear()
            if len(plan.skipped_runs) > 1:
                # Layers after the first run see a pruned state that only a pruned pass produces.
                model(x_ids, pos, PrefillAttention([0, n]), plan=plan.model_copy(update={"independent_kv": False}))
                xs = {run[0]: layers[run[0]].input_layernorm.normalize(captured[f"x{run[0]}"]).double().cpu() for run in plan.skipped_runs}
                captured.clear()
            model(x_ids, pos, PrefillAttention([0, n]))
            if len(plan.skipped_runs) == 1:
                # One run: the layers before it are the same in both passes, so the full pass's
                # state entering the run is the pruned state (one pass instead of two).
                r0 = plan.skip_layers[0]
                xs = {r0: layers[r0].input_layernorm.normalize(captured[f"x{r0}"]).double().cpu()}
            for r0, x in xs.items():
                xtx[r0] += x.T @ x
            for l in plan.skip_layers:
                x = xs[run_of[l][0]]
                for i, (name, proj) in enumerate((("k", layers[l].self_attn.k_proj), ("v", layers[l].self_attn.v_proj))):
                    y = captured[f"{name}{l}"].double().cpu()
                    if proj.bias is not None:
                        y = y - proj.bias.double().cpu()
                    xty[l][i] += x.T @ y
                    yty[l][i] += float((y * y).sum())
            num_tokens += n
    finally:
        for h in pruned_hooks + full_hooks:
            h.remove()

    weights, residuals = {}, {}
    for l in plan.skip_layers:
        r0 = run_of[l][0]
        a = xtx[r0]
        a = a + ridge * a.diagonal().mean() * torch.eye(hidden, dtype=torch.float64)
        solved = torch.linalg.solve(a, torch.cat(xty[l], dim=1))  # (hidden, 2 * kv_size)
        wk, wv = solved.split(model.arch.kv_size, dim=1)
        weights[l] = (wk.T.float().contiguous(), wv.T.float().contiguous())
        # Unexplained energy ||XW - Y||^2 / ||Y||^2, for the original (norm-folded) and fitted maps.
        proj = layers[l].self_attn
        g = layers[l].input_layernorm.effective_weight().double().cpu()
        res = {}
        for i, (name, w_orig, w_fit) in enumerate((("k", proj.k_proj.weight, wk), ("v", proj.v_proj.weight, wv))):
            w0 = (w_orig.double().cpu() * g[None, :]).T  # (hidden, kv)
            res[name] = tuple(_relative_residual(xtx[r0], xty[l][i], yty[l][i], w) for w in (w0, w_fit))
        residuals[l] = res
    return KVCorrection(plan, weights, residuals, num_tokens)


def _relative_residual(xtx, xty, yty, w) -> float:
    # ||XW - Y||^2 = tr(W^T X^T X W) - 2 tr(W^T X^T Y) + ||Y||^2, from the accumulated moments.
    err = float((w * (xtx @ w)).sum() - 2 * (w * xty).sum() + yty)
    return max(err, 0.0) / yty


@torch.no_grad()
def apply_to_prefill_model(model: CausalLM, correction: KVCorrection) -> None:
    """Load the corrected projections into a prefill-only instance built for the same plan."""
    if not model.is_prefill_only or model.prefill_only_plan.skip_layers != correction.plan.skip_layers:
        raise ValueError("a K/V correction applies to a prefill-only instance of the plan it was fitted for")
    for l, (wk, wv) in correction.weights.items():
        layer = model.model.layers[l]
        norm = layer.input_layernorm
        # Identity scale: zeros for Gemma's (1 + w), ones otherwise; the fit absorbed the real one.
        norm.weight.copy_(torch.zeros_like(norm.weight) if norm.gemma else torch.ones_like(norm.weight))
        layer.self_attn.k_proj.weight.copy_(wk.to(layer.self_attn.k_proj.weight))
        layer.self_attn.v_proj.weight.copy_(wv.to(layer.self_attn.v_proj.weight))
    model._fused.clear()  # the fused run projection is rebuilt from the new weights


def load_corrected_prefill_model(path: str | Path, correction: KVCorrection, dtype="float32", device="cpu") -> CausalLM:
    """A prefill-only instance of ``correction.plan`` with the corrected K/V projections."""
    from ..models.loader import load_model

    model = load_model(path, dtype, device, prefill_only_plan=correction.plan)
    apply_to_prefill_model(model, correction)
    return model
