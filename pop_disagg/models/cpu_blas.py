"""Which BLAS runs the model's float32 GEMMs on a CPU: torch's own (MKL in the x86 wheels) or the
OpenBLAS that numpy's wheels bundle.

On the AMD EPYC (AVX2) this project is benchmarked on (MKL does not take its tuned kernels on
non-Intel CPUs), OpenBLAS ran SmolLM2's M = 16 gate/up GEMM ~1.4x faster than MKL and the other
shapes 0-15% faster in interleaved runs, and whole batch-16 decode steps 17% faster (201 vs 243 ms,
in-process A/B); prefill-sized GEMMs were within a few percent of each other (benchmarks/results/decode/README.md,
"Decode speed"). Transformers on the same machine runs on torch's MKL.

``linear(x, w_t, bias)`` is the one entry point the decoder uses (``x @ w_t + bias``). OpenBLAS is
called through numpy on the tensors' own memory (no copies), only where that is valid and paid:
CPU float32, 2-D, at least ``MIN_ROWS`` rows, no autograd (calibration differentiates through the model and keeps torch's GEMM). Anything
else, and every GEMM under ``backend="torch"``, is torch's ``addmm``/``mm``.

The choice is process-wide, like ``torch.set_num_threads``, and made once: ``"auto"`` (the default,
or ``$POP_DISAGG_CPU_BLAS``) picks OpenBLAS on AMD CPUs when numpy's BLAS is OpenBLAS and torch's
elsewhere. A fixed rule, not a start-up timing, so that every forward in a process (an engine's, a
test's reference) uses the same GEMM and the numbers a model produces do not change from run to
run. ``configure`` (the engine's ``cpu_blas`` setting, a benchmark's ``--cpu-blas``) overrides it.
OpenBLAS always runs with as many threads as torch's intra-op pool has at the time of the call.
"""

from __future__ import annotations

import functools
import logging
import os
import platform

import numpy as np
import torch

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "openblas")


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


def resolve(backend: str) -> str:
    """``auto`` -> the concrete backend this machine gets; ``openblas`` without numpy's OpenBLAS is an error."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown CPU BLAS {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto" and os.environ.get("POP_DISAGG_CPU_BLAS", "auto") != "auto":
        return resolve(os.environ["POP_DISAGG_CPU_BLAS"])
    if backend == "auto":
        return "openblas" if numpy_has_openblas() and cpu_vendor() == "AuthenticAMD" else "torch"
    if backend == "openblas" and not numpy_has_openblas():
        raise ValueError(
            "cpu_blas='openblas' needs numpy built against OpenBLAS (the PyPI wheels are); this numpy is not"
        )
    return backend


# One-row GEMMs (batch-1 decode) stay with torch's: OpenBLAS's GEMV streamed the weights 10-25%
# faster in isolation, but whole batch-1 steps were no faster (in-process A/B: 57.6 vs 55.1 ms per
# step; benchmark runs 1.46x vs 1.67x Transformers), the numpy round trip costing what it gained.
MIN_ROWS = 2
_choice: str | None = None  # resolved on first use
_threads: int | None = None  # OpenBLAS's thread count as last set


def configure(backend: str = "auto") -> str:
    """Make ``backend`` the process's CPU float32 GEMM; returns the concrete choice."""
    global _choice
    chosen = resolve(backend)
    if chosen != _choice:
        log.info("CPU float32 GEMMs: %s", "numpy's OpenBLAS" if chosen == "openblas" else "torch's (MKL)")
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


def takes(x: torch.Tensor) -> bool:
    """Whether ``linear`` sends a GEMM over input ``x`` (with float32 weights) to OpenBLAS."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 2
        and x.shape[0] >= MIN_ROWS
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and active() == "openblas"
    )


def linear(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w_t (+ bias)`` for x (M, K) and w_t (K, N) (any strides, e.g. ``weight.t()``)."""
    if w_t.dtype == torch.float32 and takes(x):
        _match_torch_threads()
        out = torch.empty(x.shape[0], w_t.shape[1], dtype=torch.float32)
        np.matmul(_array(x), _array(w_t), out=out.numpy())
        return out.add_(bias) if bias is not None else out
    return torch.addmm(bias, x, w_t) if bias is not None else x @ w_t
