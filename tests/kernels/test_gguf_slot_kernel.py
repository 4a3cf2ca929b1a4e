"""The GPU expert kernel over GGUF slots (raw blocks, dequantized on the device) against a plain fp32
reference on the store's dequantized weights, per GGUF type and token count."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernel on CPU tensors (before it is built)

import pytest  # noqa: E402
import torch  # noqa: E402

from hybrimoe_kt.kernels.gguf_experts import GgufExperts, GgufLayerExperts  # noqa: E402
from hybrimoe_kt.kernels.gguf_torch import GGUF_SLOT_TYPES  # noqa: E402
from hybrimoe_kt.kernels.gpu_experts import gpu_experts_forward  # noqa: E402
from hybrimoe_kt.measure.slot_numerics import GGUF_SLOT_REL_TOL  # noqa: E402
from hybrimoe_kt.runtime.store_gguf import GgufExpertStore  # noqa: E402

E, H, I, K = 4, 256, 512, 2


def reference(store: GgufExpertStore, x: torch.Tensor, experts: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape[0], H)
    for t in range(x.shape[0]):
        for k in range(K):
            gate, up, down = (p.float() for p in store.expert(0, int(experts[t, k])))
            h = torch.nn.functional.silu(gate @ x[t].float()) * (up @ x[t].float())
            out[t] += w[t, k] * (down @ h)
    return out


@pytest.mark.parametrize("type_name", GGUF_SLOT_TYPES)
@pytest.mark.parametrize("n", [1, 4, 64])
def test_gguf_slot_kernel_matches_reference(type_name: str, n: int) -> None:
    gen = torch.Generator().manual_seed(5)
    g, u = (torch.randn(E, I, H, generator=gen) * H ** -0.5 for _ in range(2))
    d = torch.randn(E, H, I, generator=gen) * I ** -0.5
    store = GgufExpertStore(GgufExperts({0: GgufLayerExperts.quantize(g, u, d, (type_name,) * 3)}))
    slots = store.make_slots(E + 1, "cpu")
    slot_of = [3, 0, 4, 1]  # expert -> slot: any order
    for e, s in enumerate(slot_of):
        slots.write_blocks(s, *store.expert_blocks(0, e))
    experts = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(n)])  # [n, K]
    w = torch.softmax(torch.randn(n, K, generator=gen), -1)
    x = (torch.randn(n, H, generator=gen)).to(torch.bfloat16)
    sid = torch.tensor(slot_of, dtype=torch.int32)[experts]
    got = gpu_experts_forward(x, sid, w, slots, active_slots=sorted(set(sid.flatten().tolist())))
    ref = reference(store, x, experts, w)
    assert float((got - ref).norm() / ref.norm()) < GGUF_SLOT_REL_TOL[type_name]


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_K", "Q5_K", "Q6_K", "BF16"])
@pytest.mark.parametrize("n", [1, 4])
def test_triton_reads_gguf_slots(type_name: str, n: int) -> None:
    from hybrimoe_kt.kernels.triton_experts import triton_available, triton_experts_forward

    if not triton_available("cpu"):
        pytest.skip("triton is not installed or TRITON_INTERPRET is not set (CPU tensors need the interpreter)")
    gen = torch.Generator().manual_seed(6)
    h, i = 256, 256  # small (the interpreter is slow), whole Q4_K super-blocks
    g, u = (torch.randn(E, i, h, generator=gen) * h ** -0.5 for _ in range(2))
    d = torch.randn(E, h, i, generator=gen) * i ** -0.5
    store = GgufExpertStore(GgufExperts({0: GgufLayerExperts.quantize(g, u, d, (type_name,) * 3)}))
    slots = store.make_slots(E, "cpu")
    assert slots.uniform_type == type_name
    for e in range(E):
        slots.write_blocks(e, *store.expert_blocks(0, e))
    sid = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(n)]).to(torch.int32)
    sid[0, 1] = -1  # a pair the CPU serves
    w = torch.softmax(torch.randn(n, K, generator=gen), -1)
    x = torch.randn(n, h, generator=gen).to(torch.bfloat16)
    got = triton_experts_forward(x, sid, w, slots)
    ref = gpu_experts_forward(x, sid, w, slots, active_slots=sorted({s for s in sid.flatten().tolist() if s >= 0}))
    assert float((got - ref).norm() / ref.norm()) < 2e-2


def test_triton_reads_slots_of_mixed_types() -> None:
    """A Q4_K_M-like pool: down in Q6_K in one layer and Q4_K in the other, gate Q4_K, up Q8_0 or Q5_K."""
    from hybrimoe_kt.kernels.triton_experts import triton_available, triton_experts_forward

    if not triton_available("cpu"):
        pytest.skip("triton is not installed or TRITON_INTERPRET is not set (CPU tensors need the interpreter)")
    gen = torch.Generator().manual_seed(8)
    h = i = 256
    layers = {}
    for layer, down in enumerate(("Q6_K", "Q4_K")):
        g, u = (torch.randn(E, i, h, generator=gen) * h ** -0.5 for _ in range(2))
        d = torch.randn(E, h, i, generator=gen) * i ** -0.5
        layers[layer] = GgufLayerExperts.quantize(g, u, d, ("Q4_K", "Q5_K" if layer else "Q8_0", down))
    store = GgufExpertStore(GgufExperts(layers))
    slots = store.make_slots(4, "cpu")
    assert slots.uniform_type is None and slots.all_types_in(("Q8_0", "Q4_K", "Q5_K", "Q6_K"))
    for s, (layer, e) in enumerate([(0, 1), (1, 2), (0, 3), (1, 0)]):
        slots.write_blocks(s, *store.expert_blocks(layer, e))
    sid = torch.tensor([[0, 1], [2, 3], [1, -1]], dtype=torch.int32)
    w = torch.softmax(torch.randn(3, K, generator=gen), -1)
    x = torch.randn(3, h, generator=gen).to(torch.bfloat16)
    got = triton_experts_forward(x, sid, w, slots)
    ref = gpu_experts_forward(x, sid, w, slots, active_slots=[0, 1, 2, 3])
    assert float((got - ref).norm() / ref.norm()) < 2e-2
