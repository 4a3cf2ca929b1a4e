"""The classic kTransformers experts operator against stand-ins of kT (``fake_kt``): built on kT's base
classes on first use, constructed under meta without reading weights, loaded from kT's GGUF loader
(quantized blocks, fused or per-expert), one runtime for every layer, numerics against a torch
reference on the dequantized blocks, kT's decode interface, inference modes, the CUDA-graph refusal.
The GPU tier is the CPU stand-in (device cpu)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hybrimoe_kt.kt.classic as classic
from hybrimoe_kt.kernels.gguf_experts import GgufLayerExperts
from hybrimoe_kt.kt.classic import host

from . import fake_kt

H, I, E, K = 64, 64, 8, 2
LAYERS = (1, 2, 3)  # decoder layer 0 is dense, as in DeepSeek


class ConfigStandIn:
    hidden_size, moe_intermediate_size, n_routed_experts, num_experts_per_tok = H, I, E, K
    num_hidden_layers, num_attention_heads, num_key_value_heads, vocab_size = 4, 4, 2, 100
    intermediate_size, model_type = 128, "qwen2_moe"


def quantized(types: str | tuple[str, str, str] = "Q8_0", hidden: int = H, inter: int = I,
              layers: tuple[int, ...] = LAYERS) -> dict[int, GgufLayerExperts]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for i in layers:
        g, u = (torch.randn(E, inter, hidden, generator=gen) * hidden ** -0.5 for _ in range(2))
        d = torch.randn(E, hidden, inter, generator=gen) * inter ** -0.5
        out[i] = GgufLayerExperts.quantize(g, u, d, types)
    return out


def meta_experts(hidden: int = H, inter: int = I) -> torch.nn.ModuleList:
    def expert() -> torch.nn.Module:
        m = torch.nn.Module()
        m.gate_proj, m.up_proj = torch.nn.Linear(hidden, inter), torch.nn.Linear(hidden, inter)
        m.down_proj = torch.nn.Linear(inter, hidden)
        return m
    with torch.device("meta"):
        return torch.nn.ModuleList(expert() for _ in range(E))


def build(loader: object, layers: tuple[int, ...] = LAYERS, config: object = None, **kwargs: object) -> list:
    """One operator per MoE layer, constructed under meta as kTransformers does."""
    cls = classic.KHybriMoEExperts
    config = config or ConfigStandIn()
    kw = {"prefill_device": "cpu", "generate_device": "cpu", "out_device": "cpu", "cpu_threads": 1,
          "prefill_op": "KExpertsTorch", "generate_op": "KExpertsCPU", **kwargs}
    with torch.device("meta"):
        return [cls(key=f"model.layers.{i}.mlp.experts", gguf_loader=loader, config=config,
                    orig_module=meta_experts(), **kw) for i in layers]


def reference(lx: GgufLayerExperts, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    g, u, d = lx.dequantize()
    out = torch.zeros(x.shape[0], x.shape[1])
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e, xt = int(ids[t, j]), x[t].float()
            out[t] += float(w[t, j]) * (d[e] @ (torch.nn.functional.silu(g[e] @ xt) * (u[e] @ xt)))
    return out


def routing(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, generator=gen).to(torch.bfloat16)
    w, ids = torch.softmax(torch.randn(n, E, generator=gen), -1).topk(K, dim=-1)
    return x, ids, (w / w.sum(-1, keepdim=True)).to(torch.bfloat16)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture
def kt(monkeypatch: pytest.MonkeyPatch) -> dict:
    return fake_kt.install(monkeypatch)


def test_import_without_ktransformers_and_one_line_on_use() -> None:
    if host.available():
        pytest.skip("ktransformers is installed here; this checks a machine without it")
    assert "ktransformers" not in __import__("sys").modules
    with pytest.raises(host.ClassicHostMissing) as e:
        classic.KHybriMoEExperts  # noqa: B018
    msg = str(e.value)
    assert "\n" not in msg and "needs the classic kTransformers host" in msg and "optimize_rules/classic/" in msg


def test_class_is_built_on_kt_bases_once(kt: dict) -> None:
    from hybrimoe_kt.kt.classic import KHybriMoEExperts
    from hybrimoe_kt.kt.contract import accepted_kwargs

    assert issubclass(KHybriMoEExperts, fake_kt.BaseInjectedModule)
    assert issubclass(KHybriMoEExperts, fake_kt.KExpertsBase)
    assert classic.KHybriMoEExperts is KHybriMoEExperts
    assert f"{KHybriMoEExperts.__module__}.{KHybriMoEExperts.__qualname__}" == "hybrimoe_kt.kt.classic.KHybriMoEExperts"
    assert {"strategy", "gpu_gib", "out_device", "backend", "prefill_op", "generate_device"} <= accepted_kwargs(
        KHybriMoEExperts)


def test_construction_under_meta_reads_no_weights(kt: dict) -> None:
    loader = fake_kt.fused_loader(quantized())
    ops = build(loader)
    assert loader.reads == 0
    assert all(p.is_meta for op in ops for p in op.parameters())
    assert all(op.runtime is None and not op.is_loaded and op.mode == "UNLOAD" for op in ops)
    assert ops[0].device == "cpu" and isinstance(ops[0], fake_kt.KExpertsBase)
    assert not hasattr(ops[0].orig_module, "settings")  # own state stays off kT's wrapped module


def test_one_runtime_for_all_layers_and_numerics(kt: dict) -> None:
    layers = quantized()
    ops = build(fake_kt.fused_loader(layers))
    for op in ops[:-1]:
        op.load()
        assert op.runtime is None  # built when the last layer has loaded
    ops[-1].load()
    runtime = ops[0].runtime
    assert runtime is not None and all(op.runtime is runtime for op in ops)
    assert [op.moe_index for op in ops] == [0, 1, 2] and ops[0].registry.builds == 1
    assert {t for lx in runtime.store.layers for t in lx.types} == {"Q8_0"}
    worst = 0.0
    for step, n in enumerate([6, 1, 1, 1]):
        for op, i in zip(ops, LAYERS):
            x, ids, w = routing(n, 10 * step + i)
            out = op(x, ids, w)
            assert out.shape == (n, H) and out.dtype == torch.bfloat16 and out.device.type == "cpu"
            worst = max(worst, rel(out, reference(layers[i], x, ids, w)))
    assert worst < 5e-2
    assert ops[0].registry.builds == 1 and runtime.stats.forwards == 12
    assert runtime.stats.gpu_experts > 0 and runtime.stats.cpu_experts > 0  # both tiers ran


def test_store_views_the_loader_blocks(kt: dict) -> None:
    layers = quantized()
    loader = fake_kt.fused_loader(layers)
    ops = build(loader)
    for op in ops:
        op.load()
    blocks = ops[0].runtime.store.layers[0].gate.data
    assert np.shares_memory(blocks, loader.buffer) and np.array_equal(blocks, layers[1].gate.data)


def test_submit_and_sync_equal_forward(kt: dict) -> None:
    ops = build(fake_kt.fused_loader(quantized()), strategy="stock")
    for op in ops:
        op.load()
    x, ids, w = routing(1, 5)
    want = ops[1](x, ids, w)[0]
    ops[1].generate_experts.submit_for_one_decode(x[0], ids[0], w[0])
    with pytest.raises(RuntimeError, match="again before sync"):
        ops[1].generate_experts.submit_for_one_decode(x[0], ids[0], w[0])
    got = ops[1].generate_experts.sync_for_one_decode()
    assert got.shape == (H,) and torch.equal(got, want)
    with pytest.raises(RuntimeError, match="without a submit"):
        ops[1].generate_experts.sync_for_one_decode()


def test_kt_block_overlaps_shared_expert_through_submit_and_sync(kt: dict) -> None:
    ops = build(fake_kt.fused_loader(quantized()))
    for op in ops:
        op.load()
    orig = torch.nn.Module()
    orig.gate, orig.shared_expert, orig.top_k = torch.nn.Linear(H, E), torch.nn.Linear(H, H), K
    orig.experts = ops[0]
    block = fake_kt.KQwen2MoeSparseMoeBlock("model.layers.1.mlp", None, ConfigStandIn(), orig.to(torch.bfloat16),
                                            "cpu", "cpu")
    block.orig_module.experts = ops[0]
    with torch.no_grad():
        for t in (5, 1):  # prefill: self.experts(...); decode: submit / shared expert / sync
            h = torch.randn(1, t, H).to(torch.bfloat16)
            x = h.view(-1, H)
            w, ids = torch.softmax(orig.gate(x).float(), -1).topk(K, dim=-1)
            want = ops[0](x, ids, w.to(x.dtype)).float() + orig.shared_expert(x).float()
            assert rel(block(h).view(-1, H), want) < 2e-2


def test_modes_unload_and_reload(kt: dict) -> None:
    ops = build(fake_kt.fused_loader(quantized()))
    for op in ops:
        op.set_inference_mode(fake_kt.InferenceState.GENERATE)
    assert ops[0].mode == "GENERATE" and ops[0].registry.builds == 1
    x, ids, w = routing(2, 1)
    before = ops[2](x, ids, w)
    ops[2].set_inference_mode(fake_kt.InferenceState.UNLOAD)
    assert ops[2].mode == "UNLOAD" and all(op.runtime is None for op in ops)
    with pytest.raises(RuntimeError, match="unloaded"):
        ops[2](x, ids, w)
    with pytest.raises(RuntimeError, match="not loaded: model.layers.3.mlp.experts"):
        ops[0](x, ids, w)
    ops[2].set_inference_mode("PREFILL")
    assert ops[2].mode == "PREFILL" and ops[0].registry.builds == 2 and ops[0].runtime is ops[2].runtime
    assert rel(ops[2](x, ids, w), before) < 1e-2
    ops[1].unload()
    assert ops[1].mode == "UNLOAD" and not ops[1].is_loaded and ops[0].runtime is None
    with pytest.raises(ValueError, match="InferenceState"):
        ops[0].set_inference_mode("RESTORE")


def test_mixtral_per_expert_tensors(kt: dict) -> None:
    layers = quantized(layers=(0, 1))
    loader = fake_kt.per_expert_loader(layers)
    assert "blk.0.ffn_gate.7.weight" in loader.tensor_info and "blk.0.ffn_gate_exps.weight" not in loader.tensor_info
    cls = classic.KHybriMoEExperts
    with torch.device("meta"):
        ops = [cls(f"model.layers.{i}.block_sparse_moe.experts", loader, ConfigStandIn(), meta_experts(),
                   "cpu", "cpu", cpu_threads=1) for i in (0, 1)]
    for op in ops:
        op.load()
    store = ops[0].runtime.store
    for j, i in enumerate((0, 1)):
        for p in ("gate", "up", "down"):
            assert np.array_equal(getattr(store.layers[j], p).data, getattr(layers[i], p).data)
    x, ids, w = routing(3, 2)
    assert rel(ops[1](x, ids, w), reference(layers[1], x, ids, w)) < 5e-2


def test_mixed_k_quant_types_survive(kt: dict) -> None:
    layers = quantized(("Q4_K", "Q4_K", "Q6_K"), hidden=256, inter=256, layers=(0,))
    cls = classic.KHybriMoEExperts
    with torch.device("meta"):
        op = cls("blk.0", fake_kt.fused_loader(layers), ConfigStandIn(), meta_experts(256, 256), "cpu", "cpu",
                 cpu_threads=1, cache_ratio=0.0)
    op.load()  # the classic v0.2 key form, blk.<i>
    assert op.layer_index == 0 and op.runtime.store.layers[0].types == ("Q4_K", "Q4_K", "Q6_K")


def test_balance_serve_rows(kt: dict) -> None:
    ops = build(fake_kt.fused_loader(quantized()), strategy="stock")
    for op in ops:
        op.load()
    x, ids, w = routing(4, 3)
    out = ops[0](x, ids, w, torch.tensor([3], dtype=torch.int32), 0)
    assert torch.equal(out[3], torch.zeros(H, dtype=out.dtype))
    assert torch.equal(out[:3], ops[0](x[:3], ids[:3], w[:3]))
    with pytest.raises(ValueError, match="bsz_tensor says 9 rows"):
        ops[0](x, ids, w, torch.tensor([9]))


def test_graph_capture_is_refused(kt: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    ops = build(fake_kt.fused_loader(quantized()))
    for op in ops:
        op.load()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    x, ids, w = routing(1, 0)
    for call in (lambda: ops[0](x, ids, w), lambda: ops[0].generate_experts.submit_for_one_decode(x[0], ids[0], w[0])):
        with pytest.raises(RuntimeError, match="--use_cuda_graph False") as e:
            call()
        assert "\n" not in str(e.value)


def test_cpu_threads_from_kt_config(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_kt.install(monkeypatch, cpu_infer=3)
    (op,) = build(fake_kt.fused_loader(quantized()), layers=(1,), cpu_threads=None)
    assert op.settings.cpu_threads == 3
    (op,) = build(fake_kt.fused_loader(quantized()), layers=(1,), cpu_threads=2)
    assert op.settings.cpu_threads == 2


@pytest.mark.parametrize("kwargs, needle", [
    ({"generate_device": "cuda"}, "prefill_device 'cpu' and generate_device 'cuda' differ"),
    ({"backend": "AMXInt8"}, "backend 'AMXInt8' is not supported"),
    ({"slots": 4}, "unknown kwargs ['slots']"),
    ({"cache_ratio": 0.5, "gpu_slots": 4}, "at most one GPU expert budget"),
])
def test_bad_kwargs_are_one_line(kt: dict, kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError) as e:
        build(fake_kt.fused_loader(quantized()), layers=(1,), **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_load_errors(kt: dict) -> None:
    (op,) = build(object(), layers=(1,))
    with pytest.raises(ValueError, match="no GGUF tensor_info and get_mmap_tensor"):
        op.load()
    (op,) = build(fake_kt.fused_loader(quantized(layers=(1,))), layers=(2,))
    with pytest.raises(ValueError, match="no routed experts for decoder layer 2"):
        op.load()
    with pytest.raises(ValueError, match="passing weights"):
        build(fake_kt.fused_loader(quantized(layers=(1,))), layers=(1,))[0].load(w={"gate": None})


def test_layers_of_one_model_must_agree(kt: dict) -> None:
    loader = fake_kt.fused_loader(quantized())
    kept = build(loader, layers=(1,))  # the registry holds its members weakly: keep the model's operators
    with pytest.raises(ValueError, match="differ from model.layers.1.mlp.experts"):
        build(loader, layers=(2,), strategy="stock")
    with pytest.raises(ValueError, match="already has a HybriMoE experts operator"):
        build(loader, layers=(1,))
    del kept
    assert build(loader, layers=(1,), strategy="stock")[0].settings.strategy == "stock"  # a freed model's layers leave
