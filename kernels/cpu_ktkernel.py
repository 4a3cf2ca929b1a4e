"""kt-kernel CPU expert backend (BF16 weights) over the low-level extension ``kt_kernel.kt_kernel_ext``.

The extension reads raw pointers when a task runs, not when it is created, so every tensor whose
address is handed to a task (weights, expert map, mask, inputs, outputs, token count) is kept
referenced on this object until the task is known to have finished (``sync``). Calls with more tokens
than ``max_len`` are split into consecutive chunks; the extension's queue runs them in order.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import os
import sys
from types import ModuleType
from typing import Any, Iterator

import torch

from hybrimoe_kt.kernels.cpu_backend import check_call, check_weights

log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Send file descriptor 1 to /dev/null for the block: the extension prints "CPUInfer ... Hello /
    Goodbye" and pool set-up lines from C++ when its objects are created and destroyed."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):
        yield  # no usable stdout (closed, or interpreter shutting down): nothing to hide
        return
    libc = ctypes.CDLL(None)
    try:
        null = os.open(os.devnull, os.O_WRONLY)  # os.open, not open(): builtins may be gone at shutdown
        os.dup2(null, 1)
        os.close(null)
        yield
    finally:
        libc.fflush(None)  # C stdio buffers hold what was written while silenced
        os.dup2(saved, 1)
        os.close(saved)


# BF16 MoE classes in order of preference: AMX tiles (falls back to AVX-512 BF16 inside), then AVX2.
BF16_MOE_CLASSES = ("AMXBF16_MOE", "AVX2BF16_MOE")


# Checked with kt-kernel 0.7.2 (AVX2BF16_MOE): hidden sizes that are not a multiple of 16 crash the
# process inside the extension, so they are refused here.
HIDDEN_MULTIPLE = 16


def unsupported_shape(hidden: int, intermediate: int) -> str | None:
    """Why kt-kernel cannot run this expert shape, or None when it can."""
    if hidden % HIDDEN_MULTIPLE:
        return f"hidden={hidden} is not a multiple of {HIDDEN_MULTIPLE}"
    return None


def bf16_moe_class(kx: ModuleType) -> Any | None:
    """The best BF16 MoE class the loaded extension variant offers, or None."""
    for name in BF16_MOE_CLASSES:
        cls = getattr(kx.moe, name, None)
        if cls is not None:
            return cls
    return None


class CpuWorkerPool:
    """One kt-kernel worker pool (``CPUInfer``) shared by every MoE layer of a model.

    A pool per layer leaves idle pools spinning on the cores the working one needs (measured here:
    per-layer times 2x longer than with one pool); layers run one after another, so one pool serves
    them all. Created on first use; the backends built with it keep it alive.
    """

    def __init__(self, n_threads: int) -> None:
        if n_threads < 1:
            raise ValueError(f"n_threads must be >= 1, got {n_threads}")
        self.n_threads = n_threads
        self._infer: Any = None

    def infer(self) -> Any:
        if self._infer is None:
            kx = importlib.import_module("kt_kernel.kt_kernel_ext")
            with quiet_stdout():
                self._infer = kx.CPUInfer(self.n_threads)
        return self._infer


class KtKernelBackend:
    name = "kt-kernel"

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, n_threads: int = 1,
                 *, top_k: int | None = None, max_len: int = 256, layer_idx: int = 0,
                 pool: CpuWorkerPool | None = None):
        self.n_experts, self.hidden, self.intermediate = check_weights(gate, up, down)
        if n_threads < 1:
            raise ValueError(f"n_threads must be >= 1, got {n_threads}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        why = unsupported_shape(self.hidden, self.intermediate)
        if why is not None:
            raise ValueError(f"kt-kernel backend: {why}; pad the hidden size or use the 'torch' backend")
        self.top_k = self.n_experts if top_k is None else top_k
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k must be in 1..{self.n_experts}, got {top_k}")
        self.n_threads = n_threads
        self.max_len = max_len
        kx = importlib.import_module("kt_kernel.kt_kernel_ext")
        cls = bf16_moe_class(kx)
        if cls is None:
            raise ValueError("kt_kernel.kt_kernel_ext has no BF16 MoE class; use the 'torch' backend")
        isa = getattr(importlib.import_module("kt_kernel"), "__cpu_variant__", "?")
        self.variant = f"{isa}/{cls.__name__}"
        # Referenced for the whole life of the extension objects: the extension keeps their addresses.
        self._gate = gate.contiguous()      # [E, I, H]
        self._up = up.contiguous()          # [E, I, H]
        self._down = down.contiguous()      # [E, H, I]
        cfg = self._moe_config(kx, n_threads, layer_idx, max_len, pool)
        cfg.gate_proj = self._gate.data_ptr()
        cfg.up_proj = self._up.data_ptr()
        cfg.down_proj = self._down.data_ptr()
        self._cfg = cfg
        with quiet_stdout():
            self._moe = cls(cfg)
            self._cpu.submit(self._moe.load_weights_task(self._p2l.data_ptr()))
            self._cpu.sync()
        self._pending: list[torch.Tensor] = []  # tensors used by submitted, not yet synced tasks
        self._stream_qlen: dict[int, torch.Tensor] = {}  # rows -> length buffer of stream submits
        log.debug("kt-kernel backend ready: %s, E=%d H=%d I=%d top_k=%d threads=%d", self.variant,
                  self.n_experts, self.hidden, self.intermediate, self.top_k, n_threads)

    def _moe_config(self, kx: ModuleType, n_threads: int, layer_idx: int, max_len: int,
                    pool: CpuWorkerPool | None) -> Any:
        """The MOEConfig every kt-kernel backend starts from: the GPU mask, the (shared) worker pool,
        the sizes. Sets ``gpu_mask``, ``_p2l``, ``_pool`` and ``_cpu``; the caller adds the weights."""
        self.gpu_mask = torch.zeros(self.n_experts, dtype=torch.bool)  # [E], read at forward time
        self._p2l = torch.arange(self.n_experts, dtype=torch.int64)    # [E] physical -> logical ids
        if pool is not None and pool.n_threads != n_threads:
            raise ValueError(f"the shared worker pool has {pool.n_threads} threads, this backend wants {n_threads}")
        self._pool = pool or CpuWorkerPool(n_threads)
        self._cpu = self._pool.infer()
        cfg = kx.moe.MOEConfig(self.n_experts, self.top_k, self.hidden, self.intermediate,
                               self.gpu_mask.data_ptr())
        cfg.layer_idx = layer_idx
        cfg.pool = self._cpu.backend_
        cfg.max_len = max_len
        return cfg

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
               out: torch.Tensor) -> None:
        check_call(x, ids, weights, out, self.hidden, self.n_experts)
        k = ids.shape[1]
        if k > self.top_k:
            raise ValueError(f"ids has {k} experts per token but this backend was built with "
                             f"top_k={self.top_k}; build it with top_k >= {k}")
        x = x.contiguous()              # [N, H]
        ids = ids.contiguous()          # [N, K]
        weights = weights.contiguous()  # [N, K]
        n = x.shape[0]
        if n == 0:
            return
        for s in range(0, n, self.max_len):
            e = min(n, s + self.max_len)
            qlen = torch.tensor([e - s], dtype=torch.int32)  # [1]
            xs, ids_s, w_s, out_s = x[s:e], ids[s:e], weights[s:e], out[s:e]
            self._pending += [qlen, xs, ids_s, w_s, out_s]
            self._cpu.submit(self._moe.forward_task(qlen.data_ptr(), k, ids_s.data_ptr(), w_s.data_ptr(),
                                                    xs.data_ptr(), out_s.data_ptr()))

    def sync(self) -> None:
        self._cpu.sync()
        self._pending.clear()

    def submit_on_stream(self, stream: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                         out: torch.Tensor) -> None:
        """``submit`` queued on the CUDA stream ``stream`` (its pointer): the task starts when the stream
        reaches it, after the copies queued before it, so a CUDA graph can capture it. ``x``, ``ids``,
        ``weights`` and ``out`` must be contiguous pinned host buffers that outlive every replay (the
        graph keeps their addresses); at most ``max_len`` rows."""
        n, k = x.shape[0], ids.shape[1]
        if not 1 <= n <= self.max_len or k > self.top_k:
            raise ValueError(f"stream submit takes 1..{self.max_len} rows of at most {self.top_k} experts, "
                             f"got {n} x {k}")
        qlen = self._stream_qlen.get(n)
        if qlen is None:  # one length buffer per row count, kept for the graph's replays
            qlen = self._stream_qlen[n] = torch.tensor([n], dtype=torch.int32)
        self._cpu.submit_with_cuda_stream(stream, self._moe.forward_task(
            qlen.data_ptr(), k, ids.data_ptr(), weights.data_ptr(), x.data_ptr(), out.data_ptr()))

    def sync_on_stream(self, stream: int) -> None:
        """Make ``stream`` wait until the tasks submitted on it have written their outputs."""
        self._cpu.sync_with_cuda_stream(stream)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty(x.shape[0], self.hidden, dtype=torch.bfloat16)
        self.submit(x, ids, weights, out)
        self.sync()
        return out

    def __del__(self) -> None:
        # never free tensors that a queued task still reads
        if getattr(self, "_pending", None):
            self._cpu.sync()
        with quiet_stdout():  # the extension says goodbye when its objects go
            self.__dict__.pop("_moe", None)
            self.__dict__.pop("_cpu", None)
            self.__dict__.pop("_pool", None)
