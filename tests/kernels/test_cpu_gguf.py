"""GGUF routed experts on the CPU tier: quantizer, GgufExperts, torch and kt-kernel backends, factory."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from hybrimoe_kt.kernels import gguf_quant
from hybrimoe_kt.kernels.cpu_gguf_factory import make_gguf_cpu_backend
from hybrimoe_kt.kernels.cpu_torch_gguf import TorchGgufBackend
from hybrimoe_kt.kernels.gguf_experts import GgufExperts, GgufLayerExperts, GgufTensor
from kernel_helpers import reference, rel_err, routing, tiny_experts

E, H, I = 4, 256, 256
# Upper bounds of the quantizer's relative error on Gaussian rows (measured: 0.078, 0.038, 0.019,
# 0.0054, 0.0017).
ROUND_TRIP_BOUND = {"Q4_K": 0.1, "Q5_K": 0.05, "Q6_K": 0.025, "Q8_0": 0.008, "BF16": 0.003}
KT_TYPES = ["Q4_K", "Q5_K", "Q6_K", "Q8_0", ("Q4_K", "Q4_K", "Q6_K")]


@pytest.fixture(scope="module")
def dense() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tiny_experts(E, H, I)


def layer_of(dense: tuple[torch.Tensor, ...], types: str | tuple[str, str, str]) -> GgufLayerExperts:
    return GgufLayerExperts.quantize(*dense, types)


@pytest.fixture(scope="module")
def kx() -> object:
    try:
        import kt_kernel.kt_kernel_ext as ext
    except Exception as e:  # ImportError or the loader's RuntimeError on an unsupported CPU
        pytest.skip(f"kt-kernel extension not importable: {type(e).__name__}: {e}")
    if getattr(ext.moe, "MOE", None) is None:
        pytest.skip("kt-kernel extension has no llamafile MoE (moe.MOE)")
    return ext


# ---- quantizer -------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", list(ROUND_TRIP_BOUND))
def test_round_trip_through_gguf_dequantize(qtype: str) -> None:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    x = np.random.default_rng(0).standard_normal((3, 8, 512)).astype(np.float32)
    x[0, 0] = 0.0                       # all-zero row
    x[0, 1] = np.abs(x[0, 1])           # no negative values: the K-quant minimum is clamped to 0
    x[0, 2] = -np.abs(x[0, 2])
    q = gguf_quant.quantize(x, qtype)
    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    assert q.dtype == np.uint8 and q.shape == (3, 8, 512 // block * nbytes)
    y = gguf_quant.dequantize(q, qtype)
    assert y.shape == x.shape
    assert np.all(y[0, 0] == 0)
    assert np.linalg.norm(y - x) / np.linalg.norm(x) < ROUND_TRIP_BOUND[qtype]
    # every row, not only the average, stays close
    row_err = np.linalg.norm(y - x, axis=-1) / np.maximum(np.linalg.norm(x, axis=-1), 1e-12)
    assert row_err.max() < 2 * ROUND_TRIP_BOUND[qtype]


@pytest.mark.parametrize("qtype", gguf_quant.K_QUANT_TYPES)
def test_k_quant_sub_block_scales_land_in_place(qtype: str) -> None:
    # every group of 16 values has its own magnitude (1x..4x): a scale or min decoded for the wrong
    # sub-block would show up as a large error
    rng = np.random.default_rng(1)
    mag = rng.uniform(1.0, 4.0, size=(32, 16, 1)).astype(np.float32)
    x = (rng.standard_normal((32, 16, 16)).astype(np.float32) * mag).reshape(32, 256)
    y = gguf_quant.dequantize(gguf_quant.quantize(x, qtype), qtype)
    assert np.linalg.norm(y - x) / np.linalg.norm(x) < ROUND_TRIP_BOUND[qtype]


def test_quantizer_rejects_bad_rows_and_unknown_types() -> None:
    with pytest.raises(ValueError, match="multiple of 256"):
        gguf_quant.quantize(np.zeros((2, 128), np.float32), "Q4_K")
    with pytest.raises(ValueError, match="unknown GGUF type"):
        gguf_quant.quantize(np.zeros((2, 256), np.float32), "Q9_X")


# ---- GgufExperts -----------------------------------------------------------------------------------

def test_gguf_tensor_validation(dense: tuple[torch.Tensor, ...]) -> None:
    t = GgufTensor.quantize(dense[0], "q6_k")
    assert t.type_name == "Q6_K" and t.type_id == 14 and t.shape == (E, I, H)
    with pytest.raises(ValueError, match="unknown GGUF type"):
        GgufTensor("Q9_X", t.shape, t.data)
    with pytest.raises(ValueError, match="not supported for routed experts"):
        GgufTensor("Q4_0", t.shape, t.data)
    with pytest.raises(ValueError, match="must be uint8"):
        GgufTensor("Q6_K", (E, I, 2 * H), t.data)
    bad_down = GgufTensor.quantize(torch.zeros(E, H, 2 * I), "Q6_K")   # [E, H, 2I], not [E, H, I]
    with pytest.raises(ValueError, match="down"):
        GgufLayerExperts(t, t, bad_down)


def test_from_tensors_groups_layers(dense: tuple[torch.Tensor, ...]) -> None:
    lx = layer_of(dense, ("Q4_K", "Q4_K", "Q6_K"))
    raw = {(5, p): (t.type_name, t.data.reshape(-1), t.shape)
           for p, t in (("gate", lx.gate), ("up", lx.up), ("down", lx.down))}
    experts = GgufExperts.from_tensors(raw)
    assert list(experts.layers) == [5] and experts.layer(5).types == ("Q4_K", "Q4_K", "Q6_K")
    assert torch.equal(experts.layer(5).down.dequantize(), lx.down.dequantize())
    with pytest.raises(ValueError, match="no routed experts for layer 0"):
        experts.layer(0)
    del raw[(5, "up")]
    with pytest.raises(ValueError, match="lacks expert projections"):
        GgufExperts.from_tensors(raw)


# ---- torch GGUF backend ----------------------------------------------------------------------------

@pytest.mark.parametrize("types", ["Q4_K", "BF16", ("Q5_K", "Q8_0", "Q6_K")])
def test_torch_gguf_matches_dense_reference(dense: tuple[torch.Tensor, ...], types: object) -> None:
    lx = layer_of(dense, types)
    b = TorchGgufBackend(lx, 1, cache_experts=2)
    x, ids, w = routing(7, 2, E, H)
    ref = reference(*lx.dequantize(), x, ids, w)
    assert rel_err(b.forward(x, ids, w), ref) < 1e-2
    assert len(b._cache) <= 2 and b.dequantized >= E


def test_torch_gguf_cache_bound_and_no_cache(dense: tuple[torch.Tensor, ...]) -> None:
    lx = layer_of(dense, "Q8_0")
    x, ids, w = routing(1, 1, E, H)
    cached, uncached = TorchGgufBackend(lx, 1), TorchGgufBackend(lx, 1, cache_experts=0)
    for _ in range(3):
        assert torch.equal(cached.forward(x, ids, w), uncached.forward(x, ids, w))
    assert cached.dequantized == 1 and uncached.dequantized == 3
    with pytest.raises(ValueError, match="cache_experts"):
        TorchGgufBackend(lx, 1, cache_experts=-1)


def test_torch_gguf_negative_ids_and_mask(dense: tuple[torch.Tensor, ...]) -> None:
    lx = layer_of(dense, "Q6_K")
    b = make_gguf_cpu_backend("torch", lx, n_threads=1)
    x, ids, w = routing(6, 2, E, H)
    ids[0, 1] = -1
    b.gpu_mask[int(ids[3, 0])] = True
    ref = reference(*lx.dequantize(), x, ids, w, mask=b.gpu_mask)
    assert rel_err(b.forward(x, ids, w), ref) < 1e-2
    b.gpu_mask.fill_(True)
    assert torch.all(b.forward(x, ids, w) == 0)


# ---- kt-kernel llamafile backend -------------------------------------------------------------------

@pytest.mark.kt_kernel
@pytest.mark.parametrize("types", KT_TYPES, ids=lambda t: t if isinstance(t, str) else "-".join(t))
def test_kt_kernel_matches_torch(kx: object, dense: tuple[torch.Tensor, ...], types: object) -> None:
    from hybrimoe_kt.kernels.cpu_ktkernel_gguf import KtKernelGgufBackend

    lx = layer_of(dense, types)
    kt = KtKernelGgufBackend(lx, 1, top_k=2, max_len=16)
    tb = TorchGgufBackend(lx, 1)
    for n in (1, 12, 20):   # < 10 tokens: per-token path; 12: grouped; 20: chunks of 16 (grouped) + 4
        x, ids, w = routing(n, 2, E, H, seed=n)
        out = kt.forward(x, ids, w)
        assert rel_err(out, tb.forward(x, ids, w)) < 3e-2   # measured about 2e-2
        assert rel_err(out, reference(*lx.dequantize(), x, ids, w)) < 3e-2


@pytest.mark.kt_kernel
def test_kt_kernel_negative_ids_mask_and_async(kx: object, dense: tuple[torch.Tensor, ...]) -> None:
    lx = layer_of(dense, "Q8_0")
    kt = make_gguf_cpu_backend("kt-kernel", GgufExperts({2: lx}), 2, 1, top_k=2)
    assert type(kt).__name__ == "KtKernelGgufBackend"
    x, ids, w = routing(6, 2, E, H)
    ids[0, 1] = -1
    kt.gpu_mask[int(ids[3, 0])] = True
    ref = reference(*lx.dequantize(), x, ids, w, mask=kt.gpu_mask)
    out = torch.empty(6, H, dtype=torch.bfloat16)
    kt.submit(x.clone(), ids.clone(), w.clone(), out)   # temporaries: the backend keeps them alive
    kt.sync()
    assert rel_err(out, ref) < 3e-2
    kt.gpu_mask.fill_(True)
    assert torch.all(kt.forward(x, ids, w) == 0)


@pytest.mark.kt_kernel
def test_kt_kernel_refuses_bf16_and_bad_intermediate(kx: object, dense: tuple[torch.Tensor, ...]
                                                     ) -> None:
    from hybrimoe_kt.kernels.cpu_ktkernel_gguf import KtKernelGgufBackend

    with pytest.raises(ValueError, match="BF16.*llamafile not supported"):
        KtKernelGgufBackend(layer_of(dense, ("Q4_K", "Q4_K", "BF16")), 1)
    g, u, d = tiny_experts(E, H, 128)
    with pytest.raises(ValueError, match="intermediate=128 is not a multiple of 256"):
        KtKernelGgufBackend(GgufLayerExperts.quantize(g, u, d, "Q8_0"), 1)
    g, u, d = tiny_experts(E, 96, I)   # runs, but grouped calls would be silently wrong
    with pytest.raises(ValueError, match="hidden=96 is not a multiple of 256"):
        KtKernelGgufBackend(GgufLayerExperts.quantize(g, u, d, "Q8_0"), 1)


@pytest.mark.kt_kernel
def test_factory_routes_bf16_to_bf16_moe(kx: object, dense: tuple[torch.Tensor, ...]) -> None:
    lx = layer_of(dense, "BF16")
    b = make_gguf_cpu_backend("kt-kernel", lx, n_threads=1, top_k=2)
    assert type(b).__name__ == "KtKernelBackend"
    x, ids, w = routing(3, 2, E, H)
    assert rel_err(b.forward(x, ids, w), reference(*dense, x, ids, w)) < 1e-2


# ---- factory fallbacks (no kt-kernel call needed) --------------------------------------------------

def test_factory_falls_back_with_reason(dense: tuple[torch.Tensor, ...],
                                        caplog: pytest.LogCaptureFixture) -> None:
    g, u, d = tiny_experts(E, H, 128)
    lx = GgufLayerExperts.quantize(g, u, d, "Q8_0")    # I % 256 != 0: llamafile cannot run it
    with caplog.at_level(logging.WARNING, logger="hybrimoe_kt.kernels.cpu_gguf_factory"):
        b = make_gguf_cpu_backend("auto", lx, n_threads=1)
    assert isinstance(b, TorchGgufBackend)
    assert "torch GGUF fallback" in caplog.text
    with pytest.raises(ValueError, match="not usable"):
        make_gguf_cpu_backend("kt-kernel", lx, n_threads=1)
    with pytest.raises(ValueError, match="unknown CPU backend"):
        make_gguf_cpu_backend("gpu", lx)


def test_factory_without_extension(dense: tuple[torch.Tensor, ...], monkeypatch: pytest.MonkeyPatch,
                                   caplog: pytest.LogCaptureFixture) -> None:
    import hybrimoe_kt.kernels.cpu_ktkernel_gguf as mod

    monkeypatch.setattr(mod, "llamafile_available", lambda: (False, "extension missing (test)"))
    lx = layer_of(dense, "Q4_K")
    with caplog.at_level(logging.WARNING, logger="hybrimoe_kt.kernels.cpu_gguf_factory"):
        assert isinstance(make_gguf_cpu_backend("auto", lx, n_threads=1), TorchGgufBackend)
    assert "extension missing (test)" in caplog.text
    with pytest.raises(ValueError, match="extension missing"):
        make_gguf_cpu_backend("kt-kernel", lx, n_threads=1)


def test_gguf_file_round_trip(dense: tuple[torch.Tensor, ...], tmp_path: object) -> None:
    # K-quant blocks written to a GGUF file, read back by gguf_io, served by whichever backend `auto` picks
    import gguf

    from hybrimoe_kt.kt.gguf_io import read_gguf_experts

    lx = layer_of(dense, ("Q4_K", "Q4_K", "Q6_K"))
    path = str(tmp_path / "experts.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    for proj, t in (("gate", lx.gate), ("up", lx.up), ("down", lx.down)):
        writer.add_tensor(f"blk.1.ffn_{proj}_exps.weight", t.data,
                          raw_dtype=gguf.GGMLQuantizationType[t.type_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    experts = GgufExperts.from_tensors(read_gguf_experts(path))
    assert experts.layer(1).types == ("Q4_K", "Q4_K", "Q6_K")
    b = make_gguf_cpu_backend("auto", experts, 1, 1, top_k=2)
    x, ids, w = routing(5, 2, E, H)
    assert rel_err(b.forward(x, ids, w), reference(*lx.dequantize(), x, ids, w)) < 3e-2
