"""Routing to the host: input validation of a MoE layer call and its one device-to-host copy.

The routing ids and weights are the only tensors a layer call moves to the host (the CPU kernel and the
residency lookup need them). On a fake tier (FakeTensorMode, CI's device-placement checks) the host gets
real placeholders instead (``to_host_placeholder``).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from hybrimoe_kt.runtime.device import real_host

ToHost = Callable[[torch.Tensor, torch.dtype], torch.Tensor]


def to_host(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` on the host in ``dtype`` (no copy when it already is)."""
    return t if t.device.type == "cpu" and t.dtype == dtype else t.to("cpu", dtype)


def to_host_placeholder(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``to_host`` on a fake tier (see ``runtime.device``): ``t`` has no data, so the host gets a real
    placeholder of its shape (zeros; integer routing ids get experts ``0..k-1`` in every row, a valid
    routing) and the controller and the CPU expert kernels, which need real values and pointers, run
    for real on it."""
    from torch._subclasses.fake_tensor import FakeTensor

    if not isinstance(t, FakeTensor):
        return to_host(t, dtype)
    shape = tuple(int(d) for d in t.shape)
    with real_host():
        if dtype.is_floating_point:
            return torch.zeros(shape, dtype=dtype)
        cols = np.arange(shape[-1] if shape else 1, dtype=np.int64)
        return torch.from_numpy(np.broadcast_to(cols, shape).copy()).to(dtype)


def check_call(n_layers: int, hidden: int, top_k: int, layer: int, x: torch.Tensor, ids: torch.Tensor,
               w: torch.Tensor) -> None:
    """One clear ValueError for a malformed layer call (no data is read)."""
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} out of range 0..{n_layers - 1}")
    if x.dim() != 2 or x.shape[1] != hidden:
        raise ValueError(f"hidden states must be [N, {hidden}], got {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise ValueError(f"hidden states must be a float tensor, got {x.dtype}")
    if ids.dim() != 2 or ids.shape[0] != x.shape[0] or ids.shape[1] != top_k:
        raise ValueError(f"topk_ids must be [{x.shape[0]}, {top_k}], got {tuple(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"topk_ids must be int64 or int32, got {ids.dtype}")
    if tuple(w.shape) != tuple(ids.shape) or not w.dtype.is_floating_point:
        raise ValueError(f"topk_weights must be a float tensor of shape {tuple(ids.shape)}, got "
                         f"{w.dtype} {tuple(w.shape)}")


def route_to_host(topk_ids: torch.Tensor, topk_weights: torch.Tensor, n_experts: int, host: ToHost,
                  real: Callable):
    """``(ids_cpu, w_cpu, ids_np, w_np, flat)``: the routing on the host as tensors and numpy views;
    ``flat`` is the ids as a list for decode sizes (None above 64 ids). Ids outside -1..E-1 raise."""
    ids_cpu = host(topk_ids, torch.int64)        # [N, K]
    w_cpu = host(topk_weights, torch.float32)    # [N, K]
    with real():  # numpy views need real tensors (FakeTensorMode: the placeholders)
        ids_np, w_np = ids_cpu.numpy(), w_cpu.numpy()
    flat: Optional[list] = None
    if ids_np.size:
        if ids_np.size <= 64:  # decode: plain Python beats two numpy reductions
            flat = ids_np.ravel().tolist()
            lo, hi = min(flat), max(flat)
        else:
            lo, hi = int(ids_np.min()), int(ids_np.max())
        if hi >= n_experts or lo < -1:
            raise ValueError(f"topk_ids must be in -1..{n_experts - 1}, got {int(lo)}..{int(hi)}")
    return ids_cpu, w_cpu, ids_np, w_np, flat
