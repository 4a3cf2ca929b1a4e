"""Numerics of the GPU expert kernels reading GGUF slots, against a float32 reference MoE.

Per GGUF slot type, a layer of random experts is quantized into a ``GgufExpertStore``; every expert's
raw blocks go into a slot (``GgufSlotWeights.write_blocks``), and the kernel's output over the slots is
compared with ``reference_moe`` on the store's dequantized weights (``GgufExpertStore.expert``), so the
figure is the kernel's own error (dequantizing the slot on the device, bf16 products), not the
quantization's. Kernels: the torch slot path (``kernels.gpu_experts.gpu_experts_forward``: decode path up
to ``DECODE_MAX_ROWS`` rows, prefill above) on any device, and the Triton kernel where it runs (CUDA, or
CPU tensors under ``TRITON_INTERPRET=1``; it reads Q8_0, Q4_K, Q5_K and Q6_K slots). One routed pair of
the first row is marked ``-1`` (served by the CPU tier), as in the runtime's mixed calls.

Per token count: ``rel_err`` = ||got - ref|| / ||ref|| (Frobenius norms over the call's [N, H] output:
the measure the kernel tests bound), ``max_abs_err`` = max |got - ref| and ``ref_max_abs`` = max |ref|
for its scale. ``bench_runtime.py`` writes this as ``gguf_slot_numerics``; ``device_check.py`` reports
the relative errors as ``gguf_slots_max_rel_err``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from hybrimoe_kt.kernels.gguf_torch import GGUF_SLOT_TYPES

# ||got - ref|| / ||ref|| bound per type: tests/kernels/test_gguf_slot_kernel.py asserts it of every type
GGUF_SLOT_REL_TOL = {t: 2e-2 for t in GGUF_SLOT_TYPES}
TOKEN_COUNTS = (1, 4, 64)
SHAPE = {"n_experts": 4, "hidden": 512, "intermediate": 512, "top_k": 2}
# the interpreter runs every Triton program in numpy: calls of more rows than this are left to CUDA
INTERPRETED_MAX_TOKENS = 4


def reference_moe(weights: Any, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 MoE on the host: ``sum_k w[t,k] * down(silu(gate x) * up x)``, grouped by expert; pairs with
    ``ids < 0`` are skipped. ``weights`` has ``gate``/``up`` ``[E, I, H]`` and ``down`` ``[E, H, I]``."""
    out = torch.zeros(x.shape[0], weights.gate.shape[2], dtype=torch.float32)
    xf = x.float().cpu()
    ids, w = ids.cpu(), w.cpu().float()
    for e in ids[ids >= 0].unique().tolist():
        rows, cols = (ids == e).nonzero(as_tuple=True)
        h = F.silu(xf[rows] @ weights.gate[e].float().T) * (xf[rows] @ weights.up[e].float().T)
        out.index_add_(0, rows, (h @ weights.down[e].float().T) * w[rows, cols].unsqueeze(1))
    return out


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| (Frobenius), ``got`` on any device."""
    return float((got.float().cpu() - ref).norm() / ref.norm().clamp_min(1e-12))


def errors(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    diff = (got.float().cpu() - ref).abs()
    return {"rel_err": round(rel_err(got, ref), 6), "max_abs_err": float(f"{float(diff.max()):.4g}"),
            "ref_max_abs": float(f"{float(ref.abs().max()):.4g}")}


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU ({torch.cuda.get_device_name(device)})"
    return f"CPU stand-in (device {device})"


def _triton_skip(type_name: str, device: torch.device, interpreter: bool) -> str | None:
    """Why the Triton kernel is not measured for this type on this device, or None when it is."""
    from hybrimoe_kt.kernels.triton_experts import TRITON_GGUF_TYPES, triton_available

    if type_name not in TRITON_GGUF_TYPES:
        return f"the Triton kernel does not read {type_name} slots (it reads {', '.join(TRITON_GGUF_TYPES)})"
    if device.type == "cuda":
        return None if triton_available(device) else "triton is not installed"
    if not interpreter:
        return "CUDA only here (the interpreter on CPU tensors was not requested)"
    if not triton_available(device):
        return "the interpreter was requested but TRITON_INTERPRET=1 was not set before triton was used"
    return None


def _summary(label: str, by_tokens: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"label": label, "tokens": by_tokens,
            "max_rel_err": max(r["rel_err"] for r in by_tokens.values()),
            "max_abs_err": max(r["max_abs_err"] for r in by_tokens.values())}


def gguf_slot_numerics(device: torch.device | str = "cpu", types: Sequence[str] = GGUF_SLOT_TYPES,
                       token_counts: Sequence[int] = TOKEN_COUNTS, *, triton_interpreter: bool = False,
                       seed: int = 9) -> dict[str, Any]:
    """Per type: ``torch`` (and ``triton``, or ``triton_skipped`` with the reason) with per token count
    errors and their maxima, the type's tolerance and whether both paths are within it. The Triton kernel
    runs on CUDA, and on CPU tensors only with ``triton_interpreter`` (``TRITON_INTERPRET=1`` set before
    triton's first use; calls of at most ``INTERPRETED_MAX_TOKENS`` tokens)."""
    from hybrimoe_kt.kernels.gguf_experts import GgufExperts, GgufLayerExperts
    from hybrimoe_kt.kernels.gpu_experts import DECODE_MAX_ROWS, gpu_experts_forward
    from hybrimoe_kt.kernels.triton_experts import triton_experts_forward
    from hybrimoe_kt.runtime.device import resolve_device
    from hybrimoe_kt.runtime.store_gguf import GgufExpertStore

    dev = resolve_device(device)
    e_n, h, i, k = SHAPE["n_experts"], SHAPE["hidden"], SHAPE["intermediate"], SHAPE["top_k"]
    where = device_label(dev)
    interpreted = dev.type != "cuda"  # Triton on CPU tensors runs in the interpreter
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    for t in types:
        if t not in GGUF_SLOT_REL_TOL:
            raise ValueError(f"GGUF slots hold {', '.join(GGUF_SLOT_TYPES)}; got {t!r}")
        g, u = (torch.randn(e_n, i, h, generator=gen) * h ** -0.5 for _ in range(2))
        d = torch.randn(e_n, h, i, generator=gen) * i ** -0.5
        store = GgufExpertStore(GgufExperts({0: GgufLayerExperts.quantize(g, u, d, (t,) * 3)}))
        slots = store.make_slots(e_n, dev)
        for e in range(e_n):  # slot e holds expert e
            slots.write_blocks(e, *store.expert_blocks(0, e))
        deq = [store.expert(0, e) for e in range(e_n)]
        gate, up, down = (torch.stack([x[p] for x in deq]) for p in range(3))
        ref_w = SimpleNamespace(gate=gate, up=up, down=down)  # the store's dequantized weights
        skip = _triton_skip(t, dev, triton_interpreter)
        torch_rows: dict[str, dict[str, Any]] = {}
        triton_rows: dict[str, dict[str, Any]] = {}
        for n in token_counts:
            x = torch.randn(n, h, generator=gen).to(torch.bfloat16)
            ids = torch.stack([torch.randperm(e_n, generator=gen)[:k] for _ in range(n)])
            w = torch.softmax(torch.randn(n, k, generator=gen), -1)
            ids[0, -1] = -1  # a pair the CPU tier serves
            ref = reference_moe(ref_w, x, ids, w)
            xd, idd, wd = x.to(dev), ids.to(dev, torch.int32), w.to(dev)
            active = sorted(set(ids[ids >= 0].tolist()))
            got = gpu_experts_forward(xd, idd, wd, slots, active)
            torch_rows[str(n)] = {**errors(got, ref), "path": "decode" if n <= DECODE_MAX_ROWS else "prefill"}
            if skip is None and not (interpreted and n > INTERPRETED_MAX_TOKENS):
                triton_rows[str(n)] = errors(triton_experts_forward(xd, idd, wd, slots, active), ref)
        row: dict[str, Any] = {"torch": _summary(f"torch path (gpu_experts_forward), {where}", torch_rows)}
        if triton_rows:
            mode = "interpreter (TRITON_INTERPRET=1)" if interpreted else "compiled"
            row["triton"] = _summary(f"Triton kernel, {mode}, {where}", triton_rows)
            if len(triton_rows) < len(token_counts):
                row["triton"]["note"] = (f"interpreted: calls of at most {INTERPRETED_MAX_TOKENS} tokens "
                                         f"(the interpreter is slow)")
        else:
            row["triton_skipped"] = skip or f"interpreted: no call of at most {INTERPRETED_MAX_TOKENS} tokens asked"
        tol = GGUF_SLOT_REL_TOL[t]
        row["tolerance_rel_err"] = tol
        row["within_tolerance"] = all(row[p]["max_rel_err"] < tol for p in ("torch", "triton") if p in row)
        out[t] = row
    out["shape"] = dict(SHAPE)
    out["device"] = where
    out["method"] = ("per type: one layer of random experts quantized into a GgufExpertStore, each expert's "
                     "raw blocks in its own slot; kernel output vs a float32 MoE on the store's dequantized "
                     "weights (so the kernel's error, not the quantization's); one pair of row 0 routed to "
                     "the CPU (-1). rel_err = ||got - ref|| / ||ref|| over the call's [N, H] output, "
                     "max_abs_err = max |got - ref|, ref_max_abs = max |ref|; max_* over token counts "
                     f"{list(token_counts)}; tolerance = the kernel tests' bound on rel_err")
    return out

