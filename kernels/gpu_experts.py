"""Torch compute of the GPU-resident experts of one MoE layer, reading weights through a slot table.

``out[t] = sum_k weights[t, k] * expert_{slot_ids[t, k]}(x[t])`` over the pairs with ``slot_ids >= 0``;
``-1`` (any negative id) marks a routed expert that the GPU does not serve in this call (the CPU tier
computes it).
Per expert: ``down(silu(gate x) * up x)``; matmuls in bf16 on weights dequantised per slot on the fly,
the SiLU-gated product in fp32 (rounded to bf16 before ``down``), and the weighted sum in fp32.

Two paths:
- **decode** (small N, ``active_slots`` known on the host): for every active slot, the expert runs over
  all N rows with the per-row weight ``(weights * (slot_ids == s)).sum(1)``. No host sync and no
  data-dependent shape, so it can be captured in a CUDA graph; rows that do not use a slot cost compute
  but no extra weight reads, which dominate at small N.
- **prefill** (large N, or ``active_slots`` not given): rows are grouped by slot with a stable sort and
  ``index_select``/``index_add_``. It performs exactly one host sync: reading the per-slot row counts
  (``bincount(...).tolist()``) to cut the sorted pairs into groups.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from hybrimoe_kt.kernels.slot_weights import SlotWeights

log = logging.getLogger(__name__)

Path = Literal["auto", "decode", "prefill"]
DECODE_MAX_ROWS = 16  # auto picks the decode path up to this many rows when active_slots is given


def check_call(x: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor, slots: SlotWeights,
               out: torch.Tensor | None) -> None:
    """Validate shapes, dtypes and devices of a GPU expert call (no data is read)."""
    if x.dim() != 2 or x.shape[1] != slots.hidden:
        raise ValueError(f"x must be [N, {slots.hidden}], got {tuple(x.shape)}")
    n = x.shape[0]
    if slot_ids.dim() != 2 or slot_ids.shape[0] != n:
        raise ValueError(f"slot_ids must be [{n}, K], got {tuple(slot_ids.shape)}")
    if slot_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_ids must be int32 (or int64), got {slot_ids.dtype}")
    if weights.shape != slot_ids.shape:
        raise ValueError(f"weights must match slot_ids {tuple(slot_ids.shape)}, got {tuple(weights.shape)}")
    for name, t in (("x", x), ("slot_ids", slot_ids), ("weights", weights)):
        if t.device != slots.device:
            raise ValueError(f"{name} is on {t.device} but the slots are on {slots.device}")
    if out is not None and (out.shape != (n, slots.hidden) or out.dtype != torch.float32
                            or out.device != slots.device):
        raise ValueError(f"out must be fp32 [{n}, {slots.hidden}] on {slots.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")


def slot_expert(slots: SlotWeights, s: int, xb: torch.Tensor) -> torch.Tensor:
    """Expert in slot ``s`` on bf16 rows ``xb [M, H]``; returns fp32 ``[M, H]``."""
    gate, up, down = slots.dequant_slot(s, torch.bfloat16)  # [I, H], [I, H], [H, I]
    g = F.linear(xb, gate).float()                          # [M, I]
    u = F.linear(xb, up).float()                            # [M, I]
    h = (F.silu(g) * u).to(torch.bfloat16)                  # [M, I]
    return F.linear(h, down).float()                        # [M, H]


def _decode(x: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor, slots: SlotWeights,
            active: Sequence[int], out: torch.Tensor) -> None:
    xb = x.to(torch.bfloat16)                                    # [N, H]
    w = weights.float()                                          # [N, K]
    for s in active:
        w_s = (w * (slot_ids == s)).sum(1)                       # [N]
        out.addcmul_(slot_expert(slots, s, xb), w_s.unsqueeze(1))


def _prefill(x: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor, slots: SlotWeights,
             out: torch.Tensor) -> None:
    k = slot_ids.shape[1]
    flat = slot_ids.reshape(-1).long()                           # [N*K]
    order = torch.argsort(flat, stable=True)                     # [N*K]; the -1 pairs come first
    bucket = (flat + 1).clamp(0, slots.n_slots + 1)              # [N*K]; 0 = not served, S+1 = bad id
    counts = torch.zeros(slots.n_slots + 2, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, bucket, torch.ones_like(bucket))      # [S+2]
    counts_host = counts.tolist()                                # the one host sync of this path
    if counts_host[-1]:
        raise IndexError(f"slot_ids holds a slot >= n_slots={slots.n_slots}")
    xb = x.to(torch.bfloat16)                                    # [N, H]
    w_flat = weights.reshape(-1).float()                         # [N*K]
    start = counts_host[0]
    for s, c in enumerate(counts_host[1:-1]):
        if c == 0:
            continue
        pairs = order[start:start + c]                           # [c]
        rows = pairs // k                                        # [c]
        y = slot_expert(slots, s, xb.index_select(0, rows))      # [c, H]
        out.index_add_(0, rows, y * w_flat.index_select(0, pairs).unsqueeze(1))
        start += c


def gpu_experts_forward(x: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor, slots: SlotWeights,
                        active_slots: Sequence[int] | None = None, out: torch.Tensor | None = None, *,
                        path: Path = "auto", decode_max_rows: int = DECODE_MAX_ROWS) -> torch.Tensor:
    """Weighted sum of the slot-resident experts; returns fp32 ``[N, H]`` (``out`` if given, overwritten).

    ``x [N, H]`` (bf16 or fp32), ``slot_ids [N, K]`` int32 (``-1`` = not served here), ``weights [N, K]``.
    ``active_slots``: host-side slots used by this call (a superset is fine). ``path="auto"`` takes the
    decode path when ``active_slots`` is given and ``N <= decode_max_rows``, else the prefill path;
    ``path="decode"`` without ``active_slots`` runs every slot (still sync-free).
    """
    check_call(x, slot_ids, weights, slots, out)
    if path not in ("auto", "decode", "prefill"):
        raise ValueError(f"path must be auto, decode or prefill, got {path!r}")
    if out is None:
        out = torch.zeros(x.shape[0], slots.hidden, dtype=torch.float32, device=x.device)
    else:
        out.zero_()
    if x.shape[0] == 0:
        return out
    use_decode = path == "decode" or (path == "auto" and active_slots is not None
                                      and x.shape[0] <= decode_max_rows)
    if use_decode:
        if active_slots is None:
            active: Sequence[int] = range(slots.n_slots)
        else:
            active = list(dict.fromkeys(int(s) for s in active_slots))  # host ints, duplicates dropped
        for s in active:
            if not 0 <= s < slots.n_slots:
                raise IndexError(f"active slot {s} out of range [0, {slots.n_slots})")
        _decode(x, slot_ids, weights, slots, active, out)
    else:
        _prefill(x, slot_ids, weights, slots, out)
    return out
