"""What a GGUF expert's slot copy costs the host: the work before the DMA, against a plain memcpy of the
same bytes, per GGUF type (``bench_runtime.py`` writes it as ``gguf_copy``).

A GGUF store hands a slot copy the expert's raw blocks as views (``GgufExpertStore.expert_blocks``), so
the host prepares nothing; the earlier path dequantized the expert to bf16 on the host first
(``expert``), which is measured beside it. The memcpy is a torch copy of the same bytes into a
preallocated host buffer (the host side of a DMA from pinned memory costs less than that).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np
import torch


def _best_us(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e6


def measure_gguf_copy(types: Sequence[str] = ("Q4_K", "Q8_0"), hidden: int = 2048, inter: int = 768,
                      n_experts: int = 4, repeats: int = 20, seed: int = 0) -> dict[str, Any]:
    """Per type: bytes of one expert, host work per slot copy (``prepare_us``), a memcpy of those bytes
    (``memcpy_us``), the old host dequantization (``dequant_us``), and the store's host bytes over the
    experts' quantized bytes. Default shape: one Qwen3-30B-A3B routed expert (2048 x 768; K-quants need rows of
    256 values, which DeepSeek-V2-Lite's 1408 is not)."""
    from hybrimoe_kt.kernels.gguf_experts import GgufExperts, GgufLayerExperts
    from hybrimoe_kt.runtime.store_gguf import GgufExpertStore

    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    for t in types:
        g, u = (torch.randn(n_experts, inter, hidden, generator=gen) * hidden ** -0.5 for _ in range(2))
        d = torch.randn(n_experts, hidden, inter, generator=gen) * inter ** -0.5
        store = GgufExpertStore(GgufExperts({0: GgufLayerExperts.quantize(g, u, d, (t, t, t))}))
        _, blocks = store.expert_blocks(0, 1)
        nbytes = sum(b.numel() for b in blocks)
        dst = [torch.empty_like(b) for b in blocks]
        prepare = _best_us(lambda: store.expert_blocks(0, 1), repeats)
        memcpy = _best_us(lambda: [x.copy_(b) for x, b in zip(dst, blocks)], repeats)
        dequant = _best_us(lambda: store.expert(0, 1), max(2, repeats // 10))
        lx = store.layers[0]
        host = sum(np.asarray(p.data).nbytes for p in (lx.gate, lx.up, lx.down))
        out[t] = {"bytes_per_expert": nbytes, "prepare_us": round(prepare, 2), "memcpy_us": round(memcpy, 2),
                  "prepare_over_memcpy": round(prepare / memcpy, 4) if memcpy > 0 else None,
                  "goal_prepare_le_2x_memcpy": prepare <= 2.0 * memcpy,
                  "dequant_us_host_path_before": round(dequant, 1),
                  "store_host_bytes_over_expert_bytes": round(host / (n_experts * nbytes), 4),
                  "bf16_bytes_per_expert": 3 * hidden * inter * 2}
    out["shape"] = {"hidden": hidden, "intermediate": inter, "note": "one Qwen3-30B-A3B routed expert"}
    out["method"] = (f"best of {repeats}: prepare = GgufExpertStore.expert_blocks (what the slot pool runs before "
                     f"the copy), memcpy = torch copy of those bytes into a preallocated host buffer; "
                     f"dequant = the earlier path's host dequantization to bf16 (GgufExpertStore.expert)")
    return out
