"""kt-kernel CPU expert backend for GGUF-quantised experts, through the llamafile MoE ``kx.moe.MOE``.

The extension multiplies the raw GGUF blocks directly (activations are quantised on the fly to the
weight type's dot-product partner), so no dense copy of the weights is made here. Submitting, syncing,
chunking by ``max_len`` and keeping pointers alive are inherited from ``KtKernelBackend``; only the
configuration and weight loading differ.

Checked with kt-kernel 0.7.2 (avx2 variant) in a subprocess before being allowed here: Q4_K, Q5_K, Q6_K
and Q8_0 run (relative error about 2e-2 against torch on the dequantised weights) when hidden and
intermediate sizes are multiples of 256 (other hidden sizes give silently wrong results for calls of
10 or more tokens, so they are refused); BF16 weights abort
the whole process inside ``load_weights`` ("llamafile not supported"), so BF16 is refused. All-BF16
layers are served by the BF16 backend instead (see ``cpu_gguf_factory``).
"""

from __future__ import annotations

import importlib
import logging

import numpy as np
import torch

from hybrimoe_kt.kernels.cpu_ktkernel import CpuWorkerPool, KtKernelBackend
from hybrimoe_kt.kernels.gguf_experts import GgufLayerExperts

log = logging.getLogger(__name__)

# Weight types the llamafile MoE ran correctly on this build; anything else is refused before any
# task is created (an unsupported type terminates the process instead of raising).
LLAMAFILE_TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q8_0")
LLAMAFILE_REFUSED = {
    "BF16": "kt-kernel 0.7.2's llamafile MoE aborts the process on BF16 weights "
            "('llamafile not supported'); BF16 experts use the BF16 MoE (AVX2BF16_MOE/AMXBF16_MOE)",
}
INTERMEDIATE_MULTIPLE = 256      # the llamafile MoE splits the intermediate dim in blocks of 256
# Checked with Q8_0: hidden=96 or 288 runs, but calls of >= GROUP_MIN_LEN tokens return wrong values
# (relative error 0.3..1.0) without any error; multiples of 256 are correct on both paths.
HIDDEN_MULTIPLE_GGUF = 256
GGML_BF16 = 30                   # ggml type id of the BF16 activations handed to the kernel
M_BLOCK = 32                     # rows per parallel work item in the grouped path
GROUP_MIN_LEN = 10               # calls with fewer tokens take the per-token path


def unsupported_gguf(layer: GgufLayerExperts) -> str | None:
    """Why the llamafile MoE cannot run this layer, or None when it can."""
    for proj, t in zip(("gate", "up", "down"), layer.types):
        if t in LLAMAFILE_REFUSED:
            return f"{proj} type {t}: {LLAMAFILE_REFUSED[t]}"
        if t not in LLAMAFILE_TYPES:
            return f"{proj} type {t} is not supported by the llamafile MoE here " \
                   f"(supported: {', '.join(LLAMAFILE_TYPES)})"
    if layer.intermediate % INTERMEDIATE_MULTIPLE:
        return f"intermediate={layer.intermediate} is not a multiple of {INTERMEDIATE_MULTIPLE}"
    if layer.hidden % HIDDEN_MULTIPLE_GGUF:
        return f"hidden={layer.hidden} is not a multiple of {HIDDEN_MULTIPLE_GGUF}"
    return None


def llamafile_available() -> tuple[bool, str]:
    """(True, variant) when the extension imports and has ``moe.MOE``; else (False, reason)."""
    try:
        kx = importlib.import_module("kt_kernel.kt_kernel_ext")
    except Exception as e:  # ImportError, or the loader's RuntimeError on an unsupported CPU
        return False, f"import kt_kernel.kt_kernel_ext failed ({type(e).__name__}: {e})"
    if getattr(kx.moe, "MOE", None) is None:
        return False, "kt_kernel.kt_kernel_ext has no llamafile MoE class (moe.MOE)"
    isa = getattr(importlib.import_module("kt_kernel"), "__cpu_variant__", "?")
    return True, f"{isa}/MOE"


class KtKernelGgufBackend(KtKernelBackend):
    """One layer of GGUF experts on kt-kernel's llamafile MoE. Same protocol as ``KtKernelBackend``."""

    name = "kt-kernel"

    def __init__(self, experts: GgufLayerExperts, n_threads: int = 1, *, top_k: int | None = None,
                 max_len: int = 256, layer_idx: int = 0, pool: CpuWorkerPool | None = None):
        # The base __init__ builds the BF16 MoE, so it is not called; this sets the same attributes.
        why = unsupported_gguf(experts)
        if why is not None:
            raise ValueError(f"kt-kernel GGUF backend: {why}; use the 'torch' backend")
        if n_threads < 1:
            raise ValueError(f"n_threads must be >= 1, got {n_threads}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.n_experts, self.hidden, self.intermediate = (experts.n_experts, experts.hidden,
                                                          experts.intermediate)
        self.top_k = self.n_experts if top_k is None else top_k
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k must be in 1..{self.n_experts}, got {top_k}")
        ok, detail = llamafile_available()
        if not ok:
            raise ValueError(f"kt-kernel GGUF backend: {detail}")
        self.n_threads = n_threads
        self.max_len = max_len
        self.types = experts.types
        self.variant = f"{detail}[{'/'.join(self.types)}]"
        kx = importlib.import_module("kt_kernel.kt_kernel_ext")
        # Raw GGUF blocks, uint8 [E, O, row bytes]; referenced for the extension objects' whole life.
        self._raw = tuple(np.ascontiguousarray(t.data)
                          for t in (experts.gate, experts.up, experts.down))
        cfg = self._moe_config(kx, n_threads, layer_idx, max_len, pool)
        cfg.m_block = M_BLOCK
        cfg.group_min_len = GROUP_MIN_LEN
        cfg.group_max_len = max_len     # sizes the grouped path's buffers; calls are chunked to it
        cfg.gate_proj, cfg.up_proj, cfg.down_proj = (int(a.ctypes.data) for a in self._raw)
        cfg.gate_type, cfg.up_type, cfg.down_type = (experts.gate.type_id, experts.up.type_id,
                                                     experts.down.type_id)
        cfg.hidden_type = GGML_BF16
        self._cfg = cfg
        self._moe = kx.moe.MOE(cfg)
        self._cpu.submit(self._moe.load_weights_task(self._p2l.data_ptr()))
        self._cpu.sync()
        self._pending: list[torch.Tensor] = []  # tensors used by submitted, not yet synced tasks
        self._stream_qlen: dict[int, torch.Tensor] = {}  # rows -> length buffer of stream submits
        log.debug("kt-kernel GGUF backend ready: %s, E=%d H=%d I=%d top_k=%d threads=%d", self.variant,
                  self.n_experts, self.hidden, self.intermediate, self.top_k, n_threads)
