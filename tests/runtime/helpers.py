"""Small shared builders for runtime tests: a tiny model shape, its cost model and a torch reference."""

from __future__ import annotations

import torch

from hybrimoe_kt.core.cost import RooflineCost
from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.models import ModelPreset
from hybrimoe_kt.runtime.store import HostExpertStore

L, E, K, H, I = 3, 8, 2, 64, 128


def tiny_model(n_layers: int = L, n_experts: int = E, top_k: int = K, hidden: int = H,
               inter: int = I) -> ModelPreset:
    return ModelPreset("tiny", "none", n_layers, 0, n_experts, top_k, 0, hidden, inter, 0,
                       4 * hidden * hidden, 1000)


def tiny_cost(model: ModelPreset | None = None) -> RooflineCost:
    return RooflineCost.build(load_profile("rtx4090-ddr5"), model or tiny_model(), "bf16", "bf16")


def tiny_store(seed: int = 0) -> HostExpertStore:
    return HostExpertStore.random(L, E, H, I, seed=seed)


def reference_moe(store: HostExpertStore, layer: int, x: torch.Tensor, ids: torch.Tensor,
                  w: torch.Tensor) -> torch.Tensor:
    """Plain per-token loop in fp32: sum_k w[t,k] * down(silu(gate x) * up x)."""
    lw = store.layers[layer]
    out = torch.zeros(x.shape[0], store.hidden, dtype=torch.float32)
    xf = x.float()
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e < 0:
                continue
            g = lw.gate[e].float() @ xf[t]
            u = lw.up[e].float() @ xf[t]
            out[t] += float(w[t, k]) * (lw.down[e].float() @ (torch.nn.functional.silu(g) * u))
    return out


def random_routing(n: int, seed: int, n_experts: int = E, top_k: int = K) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, n_experts, generator=gen)
    w, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
    return ids, (w / w.sum(-1, keepdim=True)).float()
