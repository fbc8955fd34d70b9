"""Training-free K/V correction for POP's skipped layers (our extension; not in the paper).

POP computes a skipped layer's keys and values from the hidden state that reaches it in the pruned
pass, ``h`` (paper Sec. 3.2), whereas the full model would compute them from ``h_l``, the state after
the layers in between have run. The paper's Appendix A measures the drift (value cosine similarity
down to 0.46). Both methods here fit, per skipped layer, a map from ``x = norm(h)`` (the weight-free
RMS normalisation the fused skipped-run projection already applies, ``CausalLM._store_run_kv``) in
closed form on calibration tokens, ``W = (X^T X + lambda I)^{-1} X^T Y``: one solve per skipped
layer, no gradient descent.

* ``kv`` (fit after the norm): ``Y`` = the full model's pre-RoPE (pre-k-norm) K and V, less the
  projection bias. K/V are linear in the normalised input, so the fitted ``W_K', W_V'`` replace the
  layer's norm-folded K/V weights: same shapes, same prefill cost, no decoder change.
* ``state`` (fit before the norm): ``Y`` = the layer's own pre-norm input ``h_l`` divided by the
  RMS of ``h`` (the scale ``x`` was normalised by), i.e. a prediction of the residual stream the
  full model would have at layer ``l``; then the layer's own norm and K/V weights run on it. The
  norm is nonlinear (each token's predicted state is renormalised), which a map fitted after it
  cannot express. Cost: one ``H x H`` GEMM per skipped layer on top of its K/V projection.

Loading into a prefill-only instance (the disaggregated prefill worker) is one function,
``apply_to_prefill_model``: there a skipped layer's input norm and K/V projection exist only to
write K/V, so ``kv`` is loaded *as* those weights (norm scale set to identity); ``state`` replaces
the instance's skipped-run K/V step with one that maps, normalises and projects per layer. A
monolithic engine, whose decode needs the original weights of the same layers, would need a hook in
the fused projection; we do not add one.

Stored as ``kv_correction.safetensors`` beside the plan (tensors ``layers.{l}.k_proj.weight`` /
``layers.{l}.v_proj.weight`` for ``kv``, ``layers.{l}.input_map`` for ``state``; the plan JSON
and the method in the metadata; files without a method are ``kv``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..models.attention import PrefillAttention
from ..models.decoder import CausalLM
from ..pop.plan import PlanError, PrunePlan

FILE_NAME = "kv_correction.safetensors"
METHODS = ("kv", "state")
# The method `pop-disagg eval fidelity` fits unless told otherwise (the comparison that chose it:
# benchmarks/results/kv_refit/README.md, "Choosing the refit").
DEFAULT_METHOD = "kv"
# Ridge strength relative to the mean diagonal of X^T X: enough to make the solve well-posed on
# directions calibration never excites, small enough not to bias the fit (1e-4 vs 1e-2 change the
# calibration residual by < 0.1% on SmolLM2).
DEFAULT_RIDGE = 1e-4


@dataclass
class KVCorrection:
    plan: PrunePlan
    # method "kv": layer -> (W_k, W_v), each (kv_size, hidden), applied to norm(h).
    weights: dict[int, tuple[torch.Tensor, torch.Tensor]]
    # layer -> fraction of the target's energy the fit leaves unexplained on calibration data,
    # before (POP's uncorrected map) and after the fit: {"k": (before, after), "v": ...} for "kv",
    # {"state": (before, after)} for "state".
    residuals: dict[int, dict[str, tuple[float, float]]] = field(default_factory=dict)
    num_calibration_tokens: int = 0
    method: str = "kv"
    # method "state": layer -> B (hidden, hidden); the layer's input is predicted as norm(h) @ B.
    input_maps: dict[int, torch.Tensor] = field(default_factory=dict)
    fit_seconds: float = 0.0

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        tensors = {}
        for l, (wk, wv) in self.weights.items():
            tensors[f"layers.{l}.k_proj.weight"] = wk.contiguous().float()
            tensors[f"layers.{l}.v_proj.weight"] = wv.contiguous().float()
        for l, b in self.input_maps.items():
            tensors[f"layers.{l}.input_map"] = b.contiguous().float()
        meta = {
            "plan": json.dumps(self.plan.model_dump()),
            "num_calibration_tokens": str(self.num_calibration_tokens),
            "residuals": json.dumps({str(l): r for l, r in self.residuals.items()}),
            "method": self.method,
            "fit_seconds": repr(self.fit_seconds),
        }
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
            method = meta.get("method", "kv")
            if method not in METHODS:
                raise PlanError(f"{path}: unknown K/V correction method {method!r} (known: {', '.join(METHODS)})")
            weights, maps = {}, {}
            for l in plan.skip_layers:
                if method == "kv":
                    weights[l] = (f.get_tensor(f"layers.{l}.k_proj.weight"), f.get_tensor(f"layers.{l}.v_proj.weight"))
                else:
                    maps[l] = f.get_tensor(f"layers.{l}.input_map")
        residuals = {
            int(l): {k: tuple(v) for k, v in r.items()} for l, r in json.loads(meta.get("residuals", "{}")).items()
        }
        return cls(
            plan,
            weights,
            residuals,
            int(meta.get("num_calibration_tokens", 0)),
            method,
            maps,
            float(meta.get("fit_seconds", 0.0)),
        )


@dataclass
class _Moments:
    """Sufficient statistics of the least-squares fits, accumulated over calibration tokens: per
    skipped run (keyed by its first layer) ``X^T X`` of the normalised entry state, and per skipped
    layer ``X^T Y`` and the per-column energy of its target ``Y``."""

    run_of: dict[int, tuple[int, ...]]
    xtx: dict[int, torch.Tensor]
    xty: dict[int, torch.Tensor]
    yty: dict[int, torch.Tensor]
    num_tokens: int = 0

    def solve(self, l: int, ridge: float) -> torch.Tensor:
        """``W = (X^T X + lambda I)^{-1} X^T Y`` for skipped layer ``l``, (hidden, width) float64."""
        a = self.xtx[self.run_of[l][0]]
        a = a + ridge * a.diagonal().mean() * torch.eye(a.shape[0], dtype=torch.float64)
        return torch.linalg.solve(a, self.xty[l])

    def residual(self, l: int, w: torch.Tensor, cols: slice = slice(None)) -> float:
        """Fraction of the target's energy (columns ``cols``) that the map ``w`` leaves unexplained."""
        # ||XW - Y||^2 = tr(W^T X^T X W) - 2 tr(W^T X^T Y) + ||Y||^2, from the accumulated moments.
        xtx, xty, yty = self.xtx[self.run_of[l][0]], self.xty[l][:, cols], float(self.yty[l][cols].sum())
        err = float((w * (xtx @ w)).sum() - 2 * (w * xty).sum() + yty)
        return max(err, 0.0) / yty


def _accumulate(model: CausalLM, plan: PrunePlan, texts: list[list[int]], width: int, watch, target) -> _Moments:
    """Run calibration ``texts`` and accumulate the fit's moments. ``watch(layer, l, captured)``
    installs the hooks that capture what the method's target needs from the full pass and returns
    their handles; ``target(layer, l, captured, scale)`` reads the target (T, width) float64 from
    them, ``scale`` being 1 / RMS of the pruned entry state."""
    layers = model.model.layers
    hidden = model.arch.hidden_size
    m = _Moments(
        run_of={l: run for run in plan.skipped_runs for l in run},
        xtx={run[0]: torch.zeros(hidden, hidden, dtype=torch.float64) for run in plan.skipped_runs},
        xty={l: torch.zeros(hidden, width, dtype=torch.float64) for l in plan.skip_layers},
        yty={l: torch.zeros(width, dtype=torch.float64) for l in plan.skip_layers},
    )
    captured: dict[str, torch.Tensor] = {}

    def keep_output(module, args, output, name):
        captured[name] = output

    # The pruned state entering run r is the output of the kept layer before it (or the embedding).
    hooks = [
        (layers[run[0] - 1] if run[0] > 0 else model.model.embed_tokens).register_forward_hook(
            partial(keep_output, name=f"x{run[0]}")
        )
        for run in plan.skipped_runs
    ]
    for l in plan.skip_layers:
        hooks += watch(layers[l], l, captured)
    try:
        for ids in texts:
            n = len(ids)
            x_ids, pos = torch.tensor(ids, device=model.device), torch.arange(n, device=model.device)
            captured.clear()
            if len(plan.skipped_runs) > 1:
                # Layers after the first run see a pruned state that only a pruned pass produces.
                model(x_ids, pos, PrefillAttention([0, n]), plan=plan.model_copy(update={"independent_kv": False}))
                entry = {run[0]: captured[f"x{run[0]}"] for run in plan.skipped_runs}
                captured.clear()
            model(x_ids, pos, PrefillAttention([0, n]))
            if len(plan.skipped_runs) == 1:
                # One run: the layers before it are the same in both passes, so the full pass's
                # state entering the run is the pruned state (one pass instead of two).
                r0 = plan.skip_layers[0]
                entry = {r0: captured[f"x{r0}"]}
            xs, scales = {}, {}
            for r0, h in entry.items():
                norm = layers[r0].input_layernorm
                xs[r0] = norm.normalize(h).double().cpu()
                scales[r0] = torch.rsqrt(h.double().pow(2).mean(-1, keepdim=True) + norm.eps).cpu()  # 1 / RMS(h)
                m.xtx[r0] += xs[r0].T @ xs[r0]
            for l in plan.skip_layers:
                r0 = m.run_of[l][0]
                y = target(layers[l], l, captured, scales[r0])
                m.xty[l] += xs[r0].T @ y
                m.yty[l] += (y * y).sum(0)
            m.num_tokens += n
    finally:
        for h in hooks:
            h.remove()
    return m


def _fit_kv(model: CausalLM, plan: PrunePlan, texts: list[list[int]], ridge: float) -> KVCorrection:
    """Method ``kv``: fit each skipped layer's K/V weights on the normalised pruned state."""
    kv_size = model.arch.kv_size

    def watch(layer, l, captured):
        def keep(module, args, output, name):
            captured[name] = output

        return [
            layer.self_attn.k_proj.register_forward_hook(partial(keep, name=f"k{l}")),
            layer.self_attn.v_proj.register_forward_hook(partial(keep, name=f"v{l}")),
        ]

    def target(layer, l, captured, scale):
        # The full model's K and V less the projection bias, (T, 2 * kv_size).
        parts = []
        for name, proj in (("k", layer.self_attn.k_proj), ("v", layer.self_attn.v_proj)):
            y = captured[f"{name}{l}"].double().cpu()
            parts.append(y - proj.bias.double().cpu() if proj.bias is not None else y)
        return torch.cat(parts, dim=1)

    m = _accumulate(model, plan, texts, 2 * kv_size, watch, target)
    weights, residuals = {}, {}
    for l in plan.skip_layers:
        solved = m.solve(l, ridge)
        wk, wv = solved.split(kv_size, dim=1)
        weights[l] = (wk.T.float().contiguous(), wv.T.float().contiguous())
        # POP's own map: the layer's projection with its norm weight folded in.
        layer = model.model.layers[l]
        g = layer.input_layernorm.effective_weight().double().cpu()
        residuals[l] = {}
        for i, (name, w_orig) in enumerate(
            (("k", layer.self_attn.k_proj.weight), ("v", layer.self_attn.v_proj.weight))
        ):
            cols = slice(i * kv_size, (i + 1) * kv_size)
            w0 = (w_orig.double().cpu() * g[None, :]).T  # (hidden, kv)
            residuals[l][name] = (m.residual(l, w0, cols), m.residual(l, solved[:, cols], cols))
    return KVCorrection(plan, weights, residuals, m.num_tokens, "kv")


def _fit_state(model: CausalLM, plan: PrunePlan, texts: list[list[int]], ridge: float) -> KVCorrection:
    """Method ``state``: fit a map from the normalised pruned state to each skipped layer's own
    (RMS-scaled) input."""
    hidden = model.arch.hidden_size

    def watch(layer, l, captured):
        def keep(module, args, name):
            captured[name] = args[0]

        return [layer.register_forward_pre_hook(partial(keep, name=f"h{l}"))]

    def target(layer, l, captured, scale):
        return captured[f"h{l}"].double().cpu() * scale

    m = _accumulate(model, plan, texts, hidden, watch, target)
    maps, residuals = {}, {}
    eye = torch.eye(hidden, dtype=torch.float64)  # POP's own map: the layer sees the entry state itself
    for l in plan.skip_layers:
        solved = m.solve(l, ridge)
        maps[l] = solved.float().contiguous()
        residuals[l] = {"state": (m.residual(l, eye), m.residual(l, solved))}
    return KVCorrection(plan, {}, residuals, m.num_tokens, "state", maps)


_FITS = {"kv": _fit_kv, "state": _fit_state}


@torch.inference_mode()
def fit_kv_correction(
    model: CausalLM, plan: PrunePlan, texts: list[list[int]], ridge: float = DEFAULT_RIDGE, method: str = DEFAULT_METHOD
) -> KVCorrection:
    """Least-squares correction of ``plan``'s skipped layers from calibration ``texts`` (see the
    module docstring for the two methods)."""
    if method not in _FITS:
        raise ValueError(f"unknown K/V correction method {method!r} (known: {', '.join(METHODS)})")
    if plan.is_empty:
        raise PlanError("a K/V correction needs a plan that skips layers")
    if model.is_prefill_only:
        raise ValueError("fit the correction on the full model (it needs the skipped layers' full-model K/V)")
    t0 = time.perf_counter()
    correction = _FITS[method](model, plan, texts, ridge)
    correction.fit_seconds = time.perf_counter() - t0
    return correction


@torch.no_grad()
def apply_to_prefill_model(model: CausalLM, correction: KVCorrection) -> None:
    """Load ``correction`` into a prefill-only instance built for the same plan (in place).

    The one function that knows how a correction enters the decoder: the serving prefill worker,
    the fidelity evaluation and the lm-eval adapter all load through it.
    """
    if not model.is_prefill_only or model.prefill_only_plan.skip_layers != correction.plan.skip_layers:
        raise ValueError("a K/V correction applies to a prefill-only instance of the plan it was fitted for")
    if correction.method == "kv":
        for l, (wk, wv) in correction.weights.items():
            layer = model.model.layers[l]
            norm = layer.input_layernorm
            # Identity scale: zeros for Gemma's (1 + w), ones otherwise; the fit absorbed the real one.
            norm.weight.copy_(torch.zeros_like(norm.weight) if norm.gemma else torch.ones_like(norm.weight))
            layer.self_attn.k_proj.weight.copy_(wk.to(layer.self_attn.k_proj.weight))
            layer.self_attn.v_proj.weight.copy_(wv.to(layer.self_attn.v_proj.weight))
        model._fused.clear()  # the fused run projection is rebuilt from the new weights
        return
    maps = {l: b.to(device=model.device, dtype=model.dtype) for l, b in correction.input_maps.items()}

    def store_run_kv(run: tuple[int, ...], h: torch.Tensor, cos_sin, attn) -> None:
        # Replaces CausalLM._store_run_kv on this instance: per layer, predicted input -> its own
        # norm (weights included) -> its own K/V projection, bias and k-norm -> RoPE.
        x = model.model.layers[run[0]].input_layernorm.normalize(h).to(h.dtype)  # (T, hidden)
        for l in run:
            layer = model.model.layers[l]
            u = layer.input_layernorm(x @ maps[l])
            k, v = layer.self_attn.finish_kv(layer.self_attn.k_proj(u), layer.self_attn.v_proj(u), cos_sin)
            attn.store(l, k, v)

    model._store_run_kv = store_run_kv


def load_corrected_prefill_model(path: str | Path, correction: KVCorrection, dtype="float32", device="cpu") -> CausalLM:
    """A prefill-only instance of ``correction.plan`` with the correction loaded."""
    from ..models.loader import load_model

    model = load_model(path, dtype, device, prefill_only_plan=correction.plan)
    apply_to_prefill_model(model, correction)
    return model
