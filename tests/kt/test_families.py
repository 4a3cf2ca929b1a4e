"""The family table against real transformers MoE blocks: class names, stacked expert weights, and
``route`` reproducing each router; a block rebuilt from the table's pieces matches the block."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hybrimoe_kt.kt.families import (FAMILIES, expert_weights, family_of, get_family,  # noqa: E402
                                     moe_blocks, route, shared_expert_weights)
from hybrimoe_kt.kt.tiny import EXPERT_INTERMEDIATE, HIDDEN, N_EXPERTS, TOP_K, build_tiny_model  # noqa: E402


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request: pytest.FixtureRequest):
    return build_tiny_model(request.param, seed=1)


def _sorted(ids, weights):
    order = weights.float().argsort(dim=-1, descending=True, stable=True)
    return ids.gather(1, order), weights.float().gather(1, order)


def _hidden(n: int = 7, scale: float = 4.0):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, HIDDEN, generator=g) * scale   # larger scale: routing far from uniform


def test_class_names_are_real() -> None:
    import importlib

    for spec in FAMILIES.values():
        mod = importlib.import_module(f"transformers.models.{spec.model_type}.modeling_{spec.model_type}")
        for name in (spec.model_class, spec.moe_block_class, spec.router_class, spec.experts_class):
            assert hasattr(mod, name), f"{spec.name}: {name} not in {mod.__name__}"


def test_family_lookup(model) -> None:
    spec = family_of(model)
    assert family_of(model.config) is spec and get_family(spec.name) is spec
    blocks = list(moe_blocks(model))
    assert all(type(b).__name__ == spec.moe_block_class for _, b in blocks)
    assert [i for i, _ in blocks] == list(range(1 if spec.first_dense_attr else 0, 4))
    with pytest.raises(ValueError, match="known: mixtral"):
        get_family("llama")


def test_expert_weights_match_parameters(model) -> None:
    for _, block in moe_blocks(model):
        gate, up, down = expert_weights(block)
        assert gate.shape == up.shape == (N_EXPERTS, EXPERT_INTERMEDIATE, HIDDEN)
        assert down.shape == (N_EXPERTS, HIDDEN, EXPERT_INTERMEDIATE)
        assert gate.dtype == torch.bfloat16 and gate.is_contiguous()
        fused = block.experts.gate_up_proj.detach()
        assert torch.equal(gate, fused[:, :EXPERT_INTERMEDIATE].bfloat16())
        assert torch.equal(up, fused[:, EXPERT_INTERMEDIATE:].bfloat16())
        assert torch.equal(down, block.experts.down_proj.detach().bfloat16())
        g32, _, _ = expert_weights(block, dtype=torch.float32)
        assert torch.equal(g32, fused[:, :EXPERT_INTERMEDIATE])


@pytest.mark.parametrize("scale", [0.5, 4.0])
def test_route_matches_router(model, scale: float) -> None:
    x = _hidden(scale=scale)
    for _, block in moe_blocks(model):
        _, w_ref, ids_ref = block.gate(x)
        ids, w = route(block, x)
        assert ids.shape == w.shape == (x.shape[0], TOP_K) and ids.dtype == torch.int64
        ids_ref, w_ref = _sorted(ids_ref, w_ref)
        assert torch.equal(ids, ids_ref)
        torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)


def test_route_variants(model) -> None:
    """Router switches the tiny presets leave off: greedy DeepSeek-V2, renormalising Qwen2-MoE and
    OLMoE, DeepSeek-V3 without renormalisation."""
    spec = family_of(model)
    x = _hidden()
    for _, block in moe_blocks(model):
        gate = block.gate
        saved = dict(gate.__dict__)
        if hasattr(gate, "topk_method"):
            gate.topk_method = "greedy"
        if hasattr(gate, "norm_topk_prob"):
            gate.norm_topk_prob = not gate.norm_topk_prob
        try:
            _, w_ref, ids_ref = gate(x)
            ids, w = route(block, x, spec)
            ids_ref, w_ref = _sorted(ids_ref, w_ref)
            assert torch.equal(ids, ids_ref)
            torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
        finally:
            gate.__dict__.update(saved)


def test_block_rebuilt_from_table(model) -> None:
    """routed experts (expert_weights, route) + shared expert (shared_expert_weights) == the block."""
    spec = family_of(model)
    x = _hidden(n=5, scale=1.0)
    silu = torch.nn.functional.silu
    for _, block in moe_blocks(model):
        gate, up, down = expert_weights(block, dtype=torch.float32)
        ids, w = route(block, x)
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for e, we in zip(ids[t].tolist(), w[t]):
                out[t] += we * (down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])))
        shared = shared_expert_weights(block, dtype=torch.float32)
        assert (shared is None) == (spec.shared_attr is None)
        if shared is not None:
            sg, su, sd, sgate = shared
            s = (silu(x @ sg.t()) * (x @ su.t())) @ sd.t()
            out += s if sgate is None else torch.sigmoid(x @ sgate.t()) * s
        with torch.no_grad():
            ref = block(x.unsqueeze(0)).squeeze(0)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
