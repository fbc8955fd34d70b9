"""Which library runs the model's float32 GEMMs on a CPU: oneDNN on prepacked weights (through
torch's mkldnn ops, as vLLM's CPU backend does), torch's own BLAS (MKL in the x86 wheels), or the
OpenBLAS that numpy's wheels bundle.

oneDNN (``onednn``, the default wherever torch has it): each weight is reordered once into the
blocked layout oneDNN's kernels read (``mkldnn._reorder_linear_weight``), and every GEMM of two
GEMM, one-row ones included, runs on that copy (``mkldnn._linear_pointwise``). On a 2-core AMD
EPYC with AVX-512 (Zen 4), one thread, SmolLM2's shapes at M = 16 ran 1.3-1.6x faster than
``F.linear`` and its LM head 2.2x (10.7 vs 23.8 ms), at M = 512 (prefill) 1.1-1.25x, and one-row
GEMMs were level with MKL's; on a Zen 5 EPYC (avx512_vp2intersect) a one-row pass over all of
SmolLM2's weights took 23.0 ms against MKL's 33.1 (the packed layout streams at ~23 GB/s), so
oneDNN takes every row count. oneDNN picks its kernels by the CPU's ISA, not its vendor, which is
why it beats MKL on AMD. The packed copy is made on first use and again after an in-place edit of
the weight (``PackedWeight``), and costs one more copy of the weights in memory (540 MB for SmolLM2
in float32).

OpenBLAS (``openblas``): on an AMD EPYC with AVX2 only (MKL does not take its tuned kernels on
non-Intel CPUs) it ran SmolLM2's M = 16 gate/up GEMM ~1.4x faster than MKL and whole batch-16
decode steps 17% faster (benchmarks/results/decode/README.md, "Decode speed"). It is called through
numpy on the tensors' own memory (no copies), only where that is valid and paid: CPU float32, 2-D,
at least ``MIN_OPENBLAS_ROWS`` rows, no autograd.

``linear(x, w_t, bias, packed)`` is the one entry point the decoder uses (``x @ w_t + bias``).
Anything a backend does not take (autograd: calibration differentiates through the model; other
dtypes; ``torch.compile`` tracing; one row under OpenBLAS), and every GEMM under ``backend="torch"``,
is torch's ``addmm``/``mm``.

The choice is process-wide, like ``torch.set_num_threads``, and made once: ``"auto"`` (the default,
or ``$POP_DISAGG_CPU_BLAS``) picks oneDNN where torch was built with it, else OpenBLAS on AMD CPUs
when numpy's BLAS is OpenBLAS, else torch's. A fixed rule, not a start-up timing, so that every
forward in a process (an engine's, a test's reference) uses the same GEMM and the numbers a model
produces do not change from run to run. ``configure`` (the engine's ``cpu_blas`` setting, a
benchmark's ``--cpu-blas``) overrides it. OpenBLAS and oneDNN run with torch's thread count.
"""

from __future__ import annotations

import functools
import logging
import os
import platform

import numpy as np
import torch

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "openblas", "onednn")


@functools.lru_cache(maxsize=1)
def numpy_has_openblas() -> bool:
    try:
        deps = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except Exception:  # noqa: BLE001 - older numpy: no dict mode; treat as unknown
        return False
    return "openblas" in str(deps.get("name", "")).lower()


@functools.lru_cache(maxsize=1)
def cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


@functools.lru_cache(maxsize=1)
def has_onednn() -> bool:
    """torch's oneDNN linear ops are there (x86 builds; ARM builds route oneDNN through ACL, not taken)."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and platform.machine().lower() in ("x86_64", "amd64")
    )


def resolve(backend: str) -> str:
    """``auto`` -> the concrete backend this machine gets; ``openblas`` without numpy's OpenBLAS is an error."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown CPU BLAS {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto" and os.environ.get("POP_DISAGG_CPU_BLAS", "auto") != "auto":
        return resolve(os.environ["POP_DISAGG_CPU_BLAS"])
    if backend == "auto":
        if has_onednn():
            return "onednn"
        return "openblas" if numpy_has_openblas() and cpu_vendor() == "AuthenticAMD" else "torch"
    if backend == "onednn" and not has_onednn():
        raise ValueError("cpu_blas='onednn' needs a torch built with oneDNN (mkldnn) on x86; this one is not")
    if backend == "openblas" and not numpy_has_openblas():
        raise ValueError(
            "cpu_blas='openblas' needs numpy built against OpenBLAS (the PyPI wheels are); this numpy is not"
        )
    return backend


# Under OpenBLAS one-row GEMMs (batch-1 decode) stay with torch's: OpenBLAS's GEMV streamed the
# weights 10-25% faster in isolation, but whole batch-1 steps were no faster (in-process A/B: 57.6 vs 55.1 ms per
# step; benchmark runs 1.46x vs 1.67x Transformers), the numpy round trip costing what it gained.
MIN_OPENBLAS_ROWS = 2
_choice: str | None = None  # resolved on first use
_threads: int | None = None  # OpenBLAS's thread count as last set


def configure(backend: str = "auto") -> str:
    """Make ``backend`` the process's CPU float32 GEMM; returns the concrete choice."""
    global _choice
    chosen = resolve(backend)
    if chosen != _choice:
        names = {"openblas": "numpy's OpenBLAS", "onednn": "oneDNN on prepacked weights", "torch": "torch's (MKL)"}
        log.info("CPU float32 GEMMs: %s", names[chosen])
    _choice = chosen
    return chosen


def active() -> str:
    global _choice
    if _choice is None:
        _choice = resolve("auto")
    return _choice


def _match_torch_threads() -> None:
    global _threads
    n = torch.get_num_threads()
    if n != _threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=n, user_api="blas")
        _threads = n


def _array(t: torch.Tensor) -> np.ndarray:
    return (t.detach() if t.requires_grad else t).numpy()  # a parameter under no_grad still requires grad


def _is_plain_cpu_gemm(x: torch.Tensor) -> bool:
    """A CPU float32 (M, K) input outside autograd and outside ``torch.compile`` tracing."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 2
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def takes(x: torch.Tensor) -> bool:
    """Whether ``linear`` sends a GEMM over input ``x`` (with float32 weights) to another library
    than torch's own GEMM: OpenBLAS (two rows or more), or oneDNN when the weight is prepacked."""
    if not _is_plain_cpu_gemm(x):
        return False
    backend = active()
    return backend == "onednn" or (backend == "openblas" and x.shape[0] >= MIN_OPENBLAS_ROWS)


# The batch size oneDNN packs for. One packing serves every M: at M = 4..512 a weight packed for 16
# ran within 2% of one packed for its own M, and one packed for 1 was up to 1.9x slower from M = 4.
PACK_HINT = 16


class PackedWeight:
    """A GEMM weight given as (in, out) and, under oneDNN, its prepacked (out, in) copy.

    Made on first use and again whenever the weight tensor is edited in place (its version counter
    moves: tests and the K/V correction write through the checkpoint's parameter names), so the
    packed copy never serves stale values.
    """

    def __init__(self, w_t: torch.Tensor):
        self.w_t = w_t  # (in, out), any strides
        self._key: tuple | None = None
        self._packed: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        try:
            key = (self.w_t.data_ptr(), self.w_t._version)
        except RuntimeError:  # an inference tensor has no version counter: it cannot be edited in place
            key = (self.w_t.data_ptr(), None)
        if key != self._key:
            w = self.w_t.detach().t()  # (out, in)
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_HINT)
            self._key = key
        return self._packed


def linear(
    x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None = None, packed: PackedWeight | None = None
) -> torch.Tensor:
    """``x @ w_t (+ bias)`` for x (M, K) and w_t (K, N) (any strides, e.g. ``weight.t()``);
    ``packed`` (a ``PackedWeight`` of ``w_t``) lets oneDNN run it on its prepacked copy."""
    if w_t.dtype == torch.float32 and _is_plain_cpu_gemm(x):
        backend = active()
        if backend == "onednn" and packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, packed.get(), bias, "none", [], "")
        if backend == "openblas" and x.shape[0] >= MIN_OPENBLAS_ROWS:
            _match_torch_threads()
            out = torch.empty(x.shape[0], w_t.shape[1], dtype=torch.float32)
            np.matmul(_array(x), _array(w_t), out=out.numpy())
            return out.add_(bias) if bias is not None else out
    return torch.addmm(bias, x, w_t) if bias is not None else x @ w_t


def mm_nt(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` for (M, K) and (N, K) CPU float32 operands that are activations, not weights
    (attention's queries against keys, probabilities against values; any row strides): oneDNN's GEMM
    on the plain operands where it is the backend, else torch's. At attention's K = 64 (head dim)
    oneDNN ran 1.9-2.1x MKL here (Zen 5, one thread: 166 vs 83 GFLOP/s for 1536 x 512 x 64 scores,
    183 vs 86 for the values GEMM). Nothing is packed or cached: each call reads the operands as
    they are, except that a non-contiguous ``w`` is copied first: oneDNN takes a strided plain
    weight to a reference kernel ~1000x slower (0.35 ms -> 322 ms for 384 x 512 x 64)."""
    if active() == "onednn" and _is_plain_cpu_gemm(x) and w.dtype == torch.float32:
        w = w if w.is_contiguous() else w.contiguous()
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return x @ w.t()
