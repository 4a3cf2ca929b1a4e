"""HybridMoE numerics against a plain torch MoE, for every deployable strategy, prefill and decode.

The GPU tier runs on device cpu (the CPU stand-in) unless CUDA is present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrimoe_kt.runtime.device import Tier
from hybrimoe_kt.runtime.moe import HybridMoE
from tests.runtime.helpers import E, H, K, L, random_routing, reference_moe, tiny_cost, tiny_store

STRATEGIES = ["stock", "static-frequency", "lru-offload", "hybrimoe-paper", "hybrimoe-layer", "hybrimoe"]


def make(strategy: str, slots: int = 3, backend: str = "torch") -> HybridMoE:
    store = tiny_store()
    counts = np.arange(L * E, dtype=np.int64).reshape(L, E) % 5
    if strategy == "static-frequency":
        slots = slots * L  # global pool of the same total size
    return HybridMoE(store, Tier("cpu"), strategy, slots, tiny_cost(), K, counts=counts,
                     cpu_backend=backend, cpu_threads=1)


def run_and_compare(moe: HybridMoE, n_rows: list[int], shared: bool = False) -> float:
    worst = 0.0
    lin = torch.nn.Linear(H, H, bias=False).to(torch.bfloat16) if shared else None
    for step, n in enumerate(n_rows):
        for layer in range(L):
            x = torch.randn(n, H, generator=torch.Generator().manual_seed(100 * step + layer)).to(torch.bfloat16)
            ids, w = random_routing(n, seed=1000 * step + layer)
            with torch.no_grad():
                got = moe.forward(layer, x, ids, w, shared=lin).float()
            ref = reference_moe(moe.store, layer, x, ids, w)
            if lin is not None:
                with torch.no_grad():
                    ref += lin(x).float()
            err = float((got - ref).norm() / ref.norm())
            worst = max(worst, err)
    return worst


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_prefill_then_decode_matches_reference(strategy: str) -> None:
    moe = make(strategy)
    err = run_and_compare(moe, [12, 1, 1, 1, 3, 1, 1])
    assert err < 2e-2, f"{strategy}: relative error {err}"
    st = moe.stats
    assert st.forwards == 7 * L
    if strategy == "stock":
        assert st.gpu_experts == 0 and moe.pool.copies == 0
    else:
        assert st.gpu_experts > 0


@pytest.mark.parametrize("strategy", ["stock", "hybrimoe"])
def test_shared_expert_is_added_once(strategy: str) -> None:
    moe = make(strategy)
    assert run_and_compare(moe, [5, 1, 1], shared=True) < 2e-2


def test_every_expert_uses_its_own_routing_weight() -> None:
    """Bug B2 of the release: a CPU expert took another expert's weight when a cached expert preceded
    it in router order. Here expert 0 is resident (router column 0) and expert 7 runs on the CPU
    (column 1), with very different weights: the output must match the reference exactly."""
    moe = make("static-frequency", slots=1)
    placed = {e for (l, e) in moe.policies.placement if l == 0}
    hot = min(placed)
    cold = next(e for e in range(E - 1, -1, -1) if e not in placed)
    x = torch.randn(1, H, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    ids = torch.tensor([[hot, cold]])
    w = torch.tensor([[0.9, 0.1]])
    got = moe.forward(0, x, ids, w).float()
    ref = reference_moe(moe.store, 0, x, ids, w)
    assert moe.stats.gpu_experts == 1 and moe.stats.cpu_experts == 1
    assert float((got - ref).norm() / ref.norm()) < 1e-2
    swapped = reference_moe(moe.store, 0, x, ids, torch.tensor([[0.1, 0.9]]))
    assert float((got - swapped).norm() / swapped.norm()) > 0.1


def test_kt_kernel_backend_matches_reference() -> None:
    pytest.importorskip("kt_kernel.kt_kernel_ext", reason="kt-kernel is not installed")
    from hybrimoe_kt.kernels.cpu_backend import kt_kernel_available

    ok, why = kt_kernel_available()
    if not ok:
        pytest.skip(why)
    moe = make("hybrimoe", backend="kt-kernel")
    assert moe.cpu[0].name == "kt-kernel"
    assert run_and_compare(moe, [6, 1, 1]) < 3e-2
