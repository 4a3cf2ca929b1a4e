"""Shared tiny random BF16 experts and a plain per-token reference for the kernel tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def tiny_experts(e: int = 4, h: int = 64, i: int = 128, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(e, i, h, generator=g) / h**0.5).to(torch.bfloat16)  # [E, I, H]
    up = (torch.randn(e, i, h, generator=g) / h**0.5).to(torch.bfloat16)    # [E, I, H]
    down = (torch.randn(e, h, i, generator=g) / i**0.5).to(torch.bfloat16)  # [E, H, I]
    return gate, up, down


def routing(n: int, k: int, e: int, h: int, seed: int = 1
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g).to(torch.bfloat16)                              # [N, H]
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)]).long()  # [N, K]
    w = torch.rand(n, k, generator=g)                                                  # [N, K]
    return x, ids, w


def reference(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, x: torch.Tensor,
              ids: torch.Tensor, w: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """FP32 per-token loop: sum_k w * down(silu(gate x) * up x), skipping ids < 0 and masked experts."""
    out = torch.zeros(x.shape[0], x.shape[1])  # [N, H]
    for t in range(x.shape[0]):
        xt = x[t].float()
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0 or (mask is not None and bool(mask[e])):
                continue
            h = F.silu(gate[e].float() @ xt) * (up[e].float() @ xt)
            out[t] += float(w[t, j]) * (down[e].float() @ h)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))
