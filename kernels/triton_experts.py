"""Triton compute of the slot-resident experts of one layer, with no host sync (see
``_triton_expert_kernels.py`` for the kernels).

Same contract as ``gpu_experts.gpu_experts_forward``. Runs on CUDA tensors, or on CPU tensors when
``TRITON_INTERPRET=1`` is set before the kernels are first built (the interpreter is slow: tiny shapes
only). The per-token matrix-vector form suits decode (few tokens); for large prefills the torch prefill
path, which groups rows by slot into matrix products, reads each slot's weights once instead of once
per (token, k) pair.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from types import ModuleType

import torch

from hybrimoe_kt.kernels.gpu_experts import check_call
from hybrimoe_kt.kernels.quant import QuantTensor, int4_group
from hybrimoe_kt.kernels.slot_weights import SlotWeights

log = logging.getLogger(__name__)

_FMT_CODE = {"bf16": 0, "int8": 1, "int4": 2}  # the slot formats of slot_weights
_GGUF_FMT_CODE = {"Q8_0": 3, "Q4_K": 4, "Q6_K": 5, "Q5_K": 7, "BF16": 8}  # GGUF slots (gguf_slots.TYPE_CODES)
TRITON_GGUF_TYPES = tuple(_GGUF_FMT_CODE)
GGUF_MIXED = 6


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether triton is installed and can run on ``device`` (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    Without ``device``: CUDA when torch sees a GPU, else the CPU.
    """
    if importlib.util.find_spec("triton") is None:
        return False
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available()
    return _interpreting()


def _kernels() -> ModuleType:
    from hybrimoe_kt.kernels import _triton_expert_kernels  # imports triton; deferred to the first call
    return _triton_expert_kernels


def _pow2_at_most(n: int, cap: int) -> int:
    p = 1
    while p * 2 <= min(n, cap):
        p *= 2
    return p


def _block_in(fmt: str, in_dim: int, group: int, cap: int) -> int:
    if fmt == "gguf":  # 32 values per tile: a Q8_0 block, a Q4_K sub-block, a Q6_K quarter half, 32 BF16
        return 32
    if fmt == "int4":  # a power of two dividing the group, so one scale per row per tile
        b = 2
        while b * 2 <= cap and group % (b * 2) == 0:
            b *= 2
        return b
    return max(16, _pow2_at_most(_next_pow2(in_dim), cap))


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def _args(q: QuantTensor | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """(data, scale, offset, per-slot data stride, per-slot scale stride); unused pointers repeat data.
    A plain tensor is a GGUF slot projection (its scales live in its blocks)."""
    if isinstance(q, torch.Tensor):
        return q, q, q, q.stride(0), 0
    scale = q.scale if q.scale is not None else q.data
    offset = q.offset if q.offset is not None else scale
    s_stride = q.scale.stride(0) if q.scale is not None else 0
    return q.data, scale, offset, q.data.stride(0), s_stride


def triton_experts_forward(x: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor, slots: SlotWeights,
                           active_slots: Sequence[int] | None = None, out: torch.Tensor | None = None, *,
                           block_out: int | None = None, block_in: int | None = None) -> torch.Tensor:
    """Weighted sum of the slot-resident experts; fp32 ``[N, H]`` (``out`` if given, overwritten).

    ``active_slots`` is accepted for parity with ``gpu_experts_forward`` and not needed: each program
    reads its slot from ``slot_ids``. ``block_out``/``block_in`` override the tile sizes (powers of two).
    """
    check_call(x, slot_ids, weights, slots, out)
    if not triton_available(x.device):
        raise RuntimeError(f"triton cannot run on {x.device}: install triton, and for CPU tensors set "
                           "TRITON_INTERPRET=1 before the first call")
    if slots.fmt == "gguf" and not slots.all_types_in(TRITON_GGUF_TYPES):
        raise ValueError(f"the Triton kernel reads GGUF slots of {', '.join(TRITON_GGUF_TYPES)} only")
    n, k = slot_ids.shape
    hidden, inter = slots.hidden, slots.inter
    if out is None:
        out = torch.empty(n, hidden, dtype=torch.float32, device=x.device)
    elif not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if n == 0:
        return out
    if k == 0:
        return out.zero_()
    kern = _kernels()
    if slots.fmt == "gguf":  # one type throughout: its own format; else dispatch on each slot's types
        fmt = _GGUF_FMT_CODE[slots.uniform_type] if slots.uniform_type else GGUF_MIXED
    else:
        fmt = _FMT_CODE[slots.fmt]
    cap = block_in or 128
    bo = block_out or (32 if x.device.type == "cuda" else 128)
    g_h = int4_group(hidden, slots.group) if slots.fmt == "int4" else 1
    g_i = int4_group(inter, slots.group) if slots.fmt == "int4" else 1
    xc = x.contiguous()                                                   # [N, H]
    ids = slot_ids.to(torch.int32).contiguous()                           # [N, K]
    w = weights.to(torch.float32).contiguous()                            # [N, K]
    act = torch.empty(n * k, inter, dtype=torch.float32, device=x.device)  # [N*K, I]
    if slots.fmt == "gguf":  # raw blocks; per-slot type codes and row strides (rows at the widest type)
        gate, up, down = slots.data
        tg, tu, td = slots.codes
        rs_g, rs_u, rs_d = gate.stride(1), up.stride(1), down.stride(1)
    else:
        gate, up, down = slots.gate, slots.up, slots.down
        tg = tu = td = ids  # not read
        rs_g = rs_u = rs_d = 0
    wg, sg, og, w_stride, s_stride = _args(gate)
    wu, su, ou, wu_stride, _ = _args(up)
    kern.gate_up_kernel[(n * k, -(-inter // bo))](
        xc, ids, act, wg, sg, og, wu, su, ou, tg, tu, hidden, inter, k, w_stride, s_stride, rs_g,
        wu_stride, rs_u,
        FMT=fmt, GROUP=g_h, BLOCK_OUT=bo, BLOCK_IN=_block_in(slots.fmt, hidden, g_h, cap))
    wd, sd, od, wd_stride, sd_stride = _args(down)
    kern.down_kernel[(n, -(-hidden // bo))](
        act, ids, w, out, wd, sd, od, td, hidden, inter, k, wd_stride, sd_stride, rs_d,
        FMT=fmt, GROUP=g_i, BLOCK_OUT=bo, BLOCK_IN=_block_in(slots.fmt, inter, g_i, cap))
    return out
