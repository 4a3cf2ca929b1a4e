"""The CPU expert backend contract and the factory that picks an implementation.

A backend owns one MoE layer's routed experts (stacked BF16 weights) and computes, for a batch of
tokens and their routing, the weighted sum of SiLU-gated expert MLPs over the experts it serves. It
skips expert ids < 0 and every expert whose byte in ``gpu_mask`` is set (the GPU serves those); the
mask is read at compute time, so callers update it in place and never rebind it.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import torch

log = logging.getLogger(__name__)

BackendKind = Literal["auto", "kt-kernel", "torch"]
BACKEND_KINDS: tuple[str, ...] = get_args(BackendKind)


class CpuExpertBackend(Protocol):
    """One layer's routed experts on the CPU. ``submit`` may return before ``out`` is written."""

    name: str                # "kt-kernel" or "torch"
    n_experts: int
    hidden: int
    intermediate: int
    n_threads: int
    gpu_mask: torch.Tensor   # [E] bool; True = skip, the GPU serves this expert. Update in place.

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
               out: torch.Tensor) -> None:
        """Queue out[N, H] = sum_k weights[N, k] * expert_{ids[N, k]}(x[N, H]); ids < 0 are skipped."""
        ...

    def sync(self) -> None:
        """Wait until every submitted call has written its output."""
        ...

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """submit + sync; allocates ``out`` when not given and returns it."""
        ...


def physical_cores() -> int:
    """Physical cores from /proc/cpuinfo (unique (physical id, core id) pairs); os.cpu_count() otherwise."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.cpu_count() or 1
    pairs: set[tuple[str, str]] = set()
    phys = core = ""
    for line in text.splitlines() + [""]:
        if line.startswith("physical id"):
            phys = line.split(":", 1)[1].strip()
        elif line.startswith("core id"):
            core = line.split(":", 1)[1].strip()
        elif not line.strip():
            if core:
                pairs.add((phys, core))
            phys = core = ""
    return len(pairs) or os.cpu_count() or 1


def default_threads() -> int:
    """Physical cores minus one (one core stays free for the Python thread that drives the GPU)."""
    return max(1, physical_cores() - 1)


def check_weights(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> tuple[int, int, int]:
    """Validate stacked expert weights; returns (E, H, I)."""
    if gate.dim() != 3 or up.shape != gate.shape:
        raise ValueError(f"gate and up must both be [E, I, H], got {tuple(gate.shape)} and {tuple(up.shape)}")
    n_experts, inter, hidden = gate.shape
    if tuple(down.shape) != (n_experts, hidden, inter):
        raise ValueError(f"down must be [E, H, I] = {(n_experts, hidden, inter)}, got {tuple(down.shape)}")
    for name, w in (("gate", gate), ("up", up), ("down", down)):
        if w.dtype != torch.bfloat16 or w.device.type != "cpu":
            raise ValueError(f"{name} must be a bfloat16 CPU tensor, got {w.dtype} on {w.device}; "
                             f"convert with .to('cpu', torch.bfloat16)")
    return n_experts, hidden, inter


def check_call(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, out: torch.Tensor,
               hidden: int, n_experts: int) -> None:
    """Validate one call's tensors (shapes, dtypes, CPU, contiguity of ``out``)."""
    if x.dim() != 2 or x.shape[1] != hidden or x.dtype != torch.bfloat16:
        raise ValueError(f"x must be bfloat16 [N, {hidden}], got {x.dtype} {tuple(x.shape)}")
    n = x.shape[0]
    if ids.dim() != 2 or ids.shape[0] != n or ids.dtype != torch.int64:
        raise ValueError(f"ids must be int64 [{n}, K], got {ids.dtype} {tuple(ids.shape)}")
    if tuple(weights.shape) != tuple(ids.shape) or weights.dtype != torch.float32:
        raise ValueError(f"weights must be float32 {tuple(ids.shape)}, got {weights.dtype} "
                         f"{tuple(weights.shape)}")
    if tuple(out.shape) != (n, hidden) or out.dtype != torch.bfloat16 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous bfloat16 [{n}, {hidden}] tensor, got {out.dtype} "
                         f"{tuple(out.shape)}")
    for name, t in (("x", x), ("ids", ids), ("weights", weights), ("out", out)):
        if t.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got {t.device}")
    if ids.numel() and int(ids.max()) >= n_experts:
        raise ValueError(f"ids must be < n_experts={n_experts} (or < 0 to skip), got max {int(ids.max())}")


def kt_kernel_available() -> tuple[bool, str]:
    """(True, variant) when kt-kernel's extension imports and has a BF16 MoE; else (False, reason)."""
    try:
        kx = importlib.import_module("kt_kernel.kt_kernel_ext")
    except Exception as e:  # ImportError, or the loader's RuntimeError on an unsupported CPU
        return False, f"import kt_kernel.kt_kernel_ext failed ({type(e).__name__}: {e})"
    from hybrimoe_kt.kernels.cpu_ktkernel import bf16_moe_class

    cls = bf16_moe_class(kx)
    if cls is None:
        return False, "kt_kernel.kt_kernel_ext has no BF16 MoE class (AMXBF16_MOE / AVX2BF16_MOE)"
    return True, cls.__name__


def make_cpu_backend(kind: str, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                     n_threads: int | None = None, *, top_k: int | None = None,
                     max_len: int = 256, pool: Any = None, layer_idx: int = 0) -> CpuExpertBackend:
    """Build a CPU backend. ``auto`` picks kt-kernel when it imports, else torch (and logs why).

    ``pool``: a ``CpuWorkerPool`` shared by all layers of a model (kt-kernel only; one is made per
    backend when omitted)."""
    if kind not in BACKEND_KINDS:
        raise ValueError(f"unknown CPU backend {kind!r}; use one of {', '.join(BACKEND_KINDS)}")
    threads = default_threads() if n_threads is None else n_threads
    if threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {threads}")
    if kind in ("auto", "kt-kernel"):
        ok, detail = kt_kernel_available()
        if ok:
            from hybrimoe_kt.kernels.cpu_ktkernel import unsupported_shape

            why = unsupported_shape(gate.shape[2], gate.shape[1])
            if why is not None:
                ok, detail = False, f"kt-kernel cannot run this shape ({why})"
        if ok:
            from hybrimoe_kt.kernels.cpu_ktkernel import KtKernelBackend

            log.info("CPU expert backend: kt-kernel (%s), %d thread(s)", detail, threads)
            return KtKernelBackend(gate, up, down, threads, top_k=top_k, max_len=max_len,
                                   layer_idx=layer_idx, pool=pool)
        if kind == "kt-kernel":
            raise ValueError(f"CPU backend 'kt-kernel' is not usable: {detail}; install kt-kernel with "
                             f"'pip install --no-deps kt-kernel==0.7.2' if it is missing, or choose the "
                             f"'torch' backend")
        log.warning("CPU expert backend: torch fallback, because %s", detail)
    else:
        log.info("CPU expert backend: torch (requested), %d thread(s)", threads)
    from hybrimoe_kt.kernels.cpu_torch import TorchCpuBackend

    return TorchCpuBackend(gate, up, down, threads)
