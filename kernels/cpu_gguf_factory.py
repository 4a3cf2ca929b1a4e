"""Pick a CPU expert backend for one layer of GGUF-quantised experts.

``make_gguf_cpu_backend`` is the GGUF counterpart of ``cpu_backend.make_cpu_backend`` (whose dense BF16
signature is unchanged). Order of preference for ``auto`` and ``kt-kernel``:

1. all three projections BF16 -> kt-kernel's BF16 MoE on the blocks reinterpreted as BF16 tensors
   (the llamafile MoE aborts on BF16 weights);
2. Q4_K / Q5_K / Q6_K / Q8_0 (mixed allowed) -> kt-kernel's llamafile MoE;
3. otherwise ``auto`` logs why and falls back to the torch GGUF backend; ``kt-kernel`` raises.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from hybrimoe_kt.kernels.cpu_backend import (BACKEND_KINDS, CpuExpertBackend, default_threads,
                                             kt_kernel_available)
from hybrimoe_kt.kernels.gguf_experts import GgufExperts, GgufLayerExperts, GgufTensor

log = logging.getLogger(__name__)


def _as_bf16(t: GgufTensor) -> torch.Tensor:
    """BF16 GGUF blocks uint8 [E, O, 2 In] -> bfloat16 [E, O, In] (shares memory when writeable)."""
    arr = np.ascontiguousarray(t.data)
    if not arr.flags.writeable:   # e.g. a read-only file mapping; torch needs writeable memory
        arr = arr.copy()
    return torch.from_numpy(arr).view(torch.bfloat16)


def _kt_kernel_choice(layer: GgufLayerExperts) -> tuple[str | None, str]:
    """("bf16" | "llamafile", detail) when kt-kernel can serve the layer, else (None, reason)."""
    if layer.types == ("BF16", "BF16", "BF16"):
        ok, detail = kt_kernel_available()
        if not ok:
            return None, detail
        from hybrimoe_kt.kernels.cpu_ktkernel import unsupported_shape

        why = unsupported_shape(layer.hidden, layer.intermediate)
        return (None, f"kt-kernel cannot run this shape ({why})") if why else ("bf16", detail)
    from hybrimoe_kt.kernels.cpu_ktkernel_gguf import llamafile_available, unsupported_gguf

    ok, detail = llamafile_available()
    if not ok:
        return None, detail
    why = unsupported_gguf(layer)
    return (None, f"kt-kernel cannot run this layer ({why})") if why else ("llamafile", detail)


def make_gguf_cpu_backend(kind: str, experts: GgufExperts | GgufLayerExperts, layer: int = 0,
                          n_threads: int | None = None, *, top_k: int | None = None,
                          max_len: int = 256, cache_experts: int | None = None,
                          pool: Any = None) -> CpuExpertBackend:
    """Build a CPU backend for ``experts`` (one layer, or layer ``layer`` of a ``GgufExperts``).

    ``cache_experts`` bounds the torch fallback's cache of dequantised experts (default: its own).
    ``pool``: a ``CpuWorkerPool`` shared by the model's layers (kt-kernel backends only).
    """
    if kind not in BACKEND_KINDS:
        raise ValueError(f"unknown CPU backend {kind!r}; use one of {', '.join(BACKEND_KINDS)}")
    threads = default_threads() if n_threads is None else n_threads
    if threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {threads}")
    lx = experts.layer(layer) if isinstance(experts, GgufExperts) else experts
    types = "/".join(lx.types)
    if kind in ("auto", "kt-kernel"):
        choice, detail = _kt_kernel_choice(lx)
        if choice == "bf16":
            from hybrimoe_kt.kernels.cpu_ktkernel import KtKernelBackend

            log.info("CPU expert backend (layer %d, %s): kt-kernel BF16 MoE (%s), %d thread(s)", layer,
                     types, detail, threads)
            return KtKernelBackend(_as_bf16(lx.gate), _as_bf16(lx.up), _as_bf16(lx.down), threads,
                                   top_k=top_k, max_len=max_len, layer_idx=layer, pool=pool)
        if choice == "llamafile":
            from hybrimoe_kt.kernels.cpu_ktkernel_gguf import KtKernelGgufBackend

            log.info("CPU expert backend (layer %d, %s): kt-kernel llamafile MoE (%s), %d thread(s)",
                     layer, types, detail, threads)
            return KtKernelGgufBackend(lx, threads, top_k=top_k, max_len=max_len, layer_idx=layer, pool=pool)
        if kind == "kt-kernel":
            raise ValueError(f"CPU backend 'kt-kernel' is not usable for layer {layer} ({types}): "
                             f"{detail}; choose the 'torch' backend")
        log.warning("CPU expert backend (layer %d, %s): torch GGUF fallback, because %s", layer, types,
                    detail)
    else:
        log.info("CPU expert backend (layer %d, %s): torch GGUF (requested), %d thread(s)", layer,
                 types, threads)
    from hybrimoe_kt.kernels.cpu_torch_gguf import DEFAULT_CACHE_EXPERTS, TorchGgufBackend

    cache = DEFAULT_CACHE_EXPERTS if cache_experts is None else cache_experts
    return TorchGgufBackend(lx, threads, cache_experts=cache)
