"""GGUF round trip of tiny MoE models: llama.cpp tensor names, routed experts quantized and read back
within the format's error, other tensors exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from hybrimoe_kt.kt.families import FAMILIES, expert_weights, family_of, moe_blocks  # noqa: E402
from hybrimoe_kt.kt.gguf_io import (dequantize_experts, permute_rope_rows, gguf_tensor_name, read_gguf_experts,  # noqa: E402
                                    write_gguf)
from hybrimoe_kt.kt.tiny import EXPERT_INTERMEDIATE, HIDDEN, N_EXPERTS, build_tiny_model  # noqa: E402


@pytest.fixture(scope="module", params=list(FAMILIES))
def written(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    model = build_tiny_model(request.param, seed=2)
    path = write_gguf(model, tmp_path_factory.mktemp(request.param) / "model.gguf")
    return model, path


def _originals(model) -> dict[tuple[int, str], np.ndarray]:
    out = {}
    for layer, block in moe_blocks(model):
        for proj, w in zip(("gate", "up", "down"), expert_weights(block, dtype=torch.float32)):
            out[(layer, proj)] = w.numpy()
    return out


def _assert_q8_close(deq: np.ndarray, ref: np.ndarray) -> None:
    """Q8_0: blocks of 32 along the row, one fp16 scale amax/127 per block; error <= half a step
    plus the fp16 rounding of the scale times the largest code (127 * 2**-11 steps)."""
    d, r = deq.reshape(-1, 32), ref.reshape(-1, 32)
    step = np.abs(r).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(d - r) <= (0.5 + 127 * 2.0**-11) * step + 1e-7)


def test_expert_round_trip_q8_0(written) -> None:
    model, path = written
    ref = _originals(model)
    raw = read_gguf_experts(path)
    assert set(raw) == set(ref)
    for (layer, proj), (type_name, data, shape) in raw.items():
        assert type_name == "Q8_0"
        assert shape == ref[(layer, proj)].shape
        assert data.dtype == np.uint8 and data.shape[-1] == shape[-1] // 32 * 34
    deq = dequantize_experts(raw)
    for key, w in ref.items():
        assert deq[key].shape == w.shape and deq[key].dtype == np.float32
        _assert_q8_close(deq[key], w)
    assert deq[next(iter(ref))].shape in {(N_EXPERTS, EXPERT_INTERMEDIATE, HIDDEN)}


def test_other_tensors_named_and_exact(written) -> None:
    model, path = written
    spec = family_of(model)
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == spec.gguf_arch
    for name in ("token_embd.weight", "output_norm.weight", "output.weight"):
        assert name in tensors
    for layer, _ in moe_blocks(model):
        assert f"blk.{layer}.ffn_gate_inp.weight" in tensors
        if spec.shared_attr:
            assert f"blk.{layer}.ffn_down_shexp.weight" in tensors
    state = model.state_dict()
    skip = {n for n in state if ".experts." in n}
    assert not [n for n in state if n not in skip and gguf_tensor_name(n) == n], "unmapped tensor names"
    for name, value in state.items():
        if name in skip:
            continue
        gname = gguf_tensor_name(name)
        t = tensors[gname]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        data = np.asarray(t.data).reshape(value.shape)
        if spec.gguf_arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):  # llama.cpp's row order
            cfg = model.config
            heads = cfg.num_attention_heads if gname.endswith("attn_q.weight") else cfg.num_key_value_heads
            assert not np.array_equal(data, value.float().numpy())
            data = permute_rope_rows(data, heads, inverse=True)
        np.testing.assert_array_equal(data, value.float().numpy())


@pytest.mark.parametrize("expert_type,tol", [("bf16", 8e-3), ("q4_0", 0.15), ("f32", 0.0)])
def test_other_expert_types(tmp_path: Path, expert_type: str, tol: float) -> None:
    model = build_tiny_model("mixtral", seed=2)
    path = write_gguf(model, tmp_path / "m.gguf", expert_type=expert_type)
    raw = read_gguf_experts(path)
    assert {t for t, _, _ in raw.values()} == {expert_type.upper()}
    deq = dequantize_experts(raw)
    for key, w in _originals(model).items():
        rel = np.abs(deq[key] - w).max() / np.abs(w).max()
        assert rel <= tol, (key, rel)


def test_errors(tmp_path: Path) -> None:
    model = build_tiny_model("olmoe")
    with pytest.raises(ValueError, match="q4_k"):
        write_gguf(model, tmp_path / "m.gguf", expert_type="q4_k")
    with pytest.raises(ValueError, match="does not exist"):
        read_gguf_experts(tmp_path / "missing.gguf")
