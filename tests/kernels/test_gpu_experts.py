"""GPU expert slots (bf16/int8/int4), the torch decode/prefill paths and the Triton kernels.

Runs on the CPU: the torch paths on CPU tensors, the Triton kernels under ``TRITON_INTERPRET=1`` (set here
before the kernels are first built, only when torch sees no GPU). The ``gpu`` test repeats it on CUDA.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from hybrimoe_kt.kernels.gpu_experts import gpu_experts_forward  # noqa: E402
from hybrimoe_kt.kernels.quant import QuantTensor, dequantize, unpack_int4  # noqa: E402
from hybrimoe_kt.kernels.slot_weights import SlotWeights, quantize_expert  # noqa: E402
from hybrimoe_kt.kernels.triton_experts import triton_available, triton_experts_forward  # noqa: E402
from kernel_helpers import reference, rel_err, tiny_experts  # noqa: E402

FORMATS = ("bf16", "int8", "int4")
WEIGHT_BOUND = {"bf16": 0.0, "int8": 1e-2, "int4": 0.1}    # dequantised weights vs bf16 weights
OUTPUT_BOUND = {"bf16": 1e-2, "int8": 3e-2, "int4": 0.25}  # layer output vs the bf16 expert output
S, H, I = 4, 64, 128
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_slots(fmt: str, s: int = S, h: int = H, i: int = I, device: str = "cpu", group: int = 128
               ) -> tuple[SlotWeights, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    gate, up, down = tiny_experts(s, h, i)
    slots = SlotWeights.allocate(s, h, i, fmt, device, group=group)
    for j in range(s):
        slots.write_slot(j, gate[j], up[j], down[j])
    return slots, (gate, up, down)


def dequant_all(slots: SlotWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    per = [slots.dequant_slot(j) for j in range(slots.n_slots)]
    return tuple(torch.stack([p[m] for p in per]).cpu() for m in range(3))  # type: ignore[return-value]


def routing_with_holes(n: int = 6, h: int = H, seed: int = 3
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K = 2; -1 entries, a fully unserved row, slots shared across rows and one repeated inside a row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g).to(torch.bfloat16)                      # [N, H]
    base = [[0, 1], [1, -1], [2, 3], [-1, -1], [3, 0], [1, 1]]
    ids = torch.tensor((base * (n // len(base) + 1))[:n], dtype=torch.int32)  # [N, K]
    w = torch.rand(n, 2, generator=g)                                          # [N, K]
    return x, ids, w


def expected(slots: SlotWeights, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return reference(*dequant_all(slots), x.cpu(), ids.long().cpu(), w.cpu())


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantization_error_bounds(fmt: str) -> None:
    slots, (gate, up, down) = make_slots(fmt)
    dg, du, dd = dequant_all(slots)
    for deq, ref in ((dg, gate), (du, up), (dd, down)):
        err = rel_err(deq, ref.float())
        assert err <= WEIGHT_BOUND[fmt], f"{fmt}: weight rel err {err:.4f}"


def test_int4_packing_layout_and_groups() -> None:
    data = torch.tensor([[0x21, 0xF0]], dtype=torch.uint8)   # one row, inputs 0..3 = 1, 2, 0, 15
    assert unpack_int4(data).tolist() == [[1, 2, 0, 15]]
    qt = QuantTensor(data, scale=torch.tensor([[2.0, 0.5]]), offset=torch.tensor([[-1.0, 3.0]]))  # G = 2
    assert dequantize(qt, "int4").tolist() == [[1.0, 3.0, 3.0, 10.5]]


def test_packed_copy_equals_write_slot() -> None:
    slots, (gate, up, down) = make_slots("int4", group=32)
    other = SlotWeights.allocate(S, H, I, "int4", group=32)
    other.write_packed(2, quantize_expert(gate[2], up[2], down[2], "int4", group=32))
    for a, b in zip(slots.dequant_slot(2), other.dequant_slot(2)):
        assert torch.equal(a, b)
    assert slots.gate.scale is not None and slots.gate.scale.shape == (S, I, H // 32)
    with pytest.raises(ValueError, match="int8"):
        other.write_packed(0, quantize_expert(gate[0], up[0], down[0], "int8"))
    with pytest.raises(IndexError):
        other.dequant_slot(S)
    with pytest.raises(ValueError, match="unknown slot format"):
        SlotWeights.allocate(S, H, I, "fp8")


def test_slot_bytes_shrink_with_the_format() -> None:
    sizes = {fmt: SlotWeights.allocate(1, 256, 512, fmt).slot_nbytes() for fmt in FORMATS}
    assert sizes["bf16"] == 3 * 256 * 512 * 2
    assert sizes["int8"] < 0.52 * sizes["bf16"] and sizes["int4"] < 0.3 * sizes["bf16"]


# ----------------------------------------------------------------------------- torch paths


@pytest.mark.parametrize("path", ["decode", "prefill"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_torch_paths_match_per_token_reference(fmt: str, path: str) -> None:
    slots, (gate, up, down) = make_slots(fmt, group=32)
    x, ids, w = routing_with_holes()
    out = gpu_experts_forward(x, ids, w, slots, [0, 1, 2, 3], path=path)  # type: ignore[arg-type]
    assert out.dtype == torch.float32 and out.shape == (6, H)
    assert rel_err(out, expected(slots, x, ids, w)) < 1e-2
    assert torch.all(out[3] == 0)                                   # the row with no served expert
    bf16_out = reference(gate, up, down, x, ids.long(), w)
    assert rel_err(out, bf16_out) < OUTPUT_BOUND[fmt]


def test_auto_path_and_active_slot_subsets() -> None:
    slots, _ = make_slots("int8")
    x, ids, w = routing_with_holes()
    ref = expected(slots, x, ids, w)
    assert rel_err(gpu_experts_forward(x, ids, w, slots, [3, 0, 1, 2, 2]), ref) < 1e-2  # duplicates ok
    assert rel_err(gpu_experts_forward(x, ids, w, slots), ref) < 1e-2                  # prefill
    assert rel_err(gpu_experts_forward(x, ids, w, slots, path="decode"), ref) < 1e-2   # all slots
    only0 = gpu_experts_forward(x, ids, w, slots, [0])     # slots left out of active_slots are not run
    masked = torch.where(ids == 0, ids, torch.full_like(ids, -1))
    assert rel_err(only0, expected(slots, x, masked, w)) < 1e-2


def test_out_is_overwritten_and_returned() -> None:
    slots, _ = make_slots("bf16")
    x, ids, w = routing_with_holes()
    for path in ("decode", "prefill"):
        buf = torch.full((6, H), 7.0)
        res = gpu_experts_forward(x, ids, w, slots, [0, 1, 2, 3], out=buf,
                                  path=path)  # type: ignore[arg-type]
        assert res is buf and rel_err(buf, expected(slots, x, ids, w)) < 1e-2
    empty = gpu_experts_forward(x[:0], ids[:0], w[:0], slots, [0])
    assert empty.shape == (0, H)


def test_bad_calls_raise() -> None:
    slots, _ = make_slots("bf16")
    x, ids, w = routing_with_holes()
    with pytest.raises(ValueError, match="x must be"):
        gpu_experts_forward(x[:, :8], ids, w, slots)
    with pytest.raises(ValueError, match="weights must match"):
        gpu_experts_forward(x, ids, w[:, :1], slots)
    with pytest.raises(IndexError, match="n_slots"):
        gpu_experts_forward(x, torch.full_like(ids, S), w, slots, path="prefill")
    with pytest.raises(IndexError, match="active slot"):
        gpu_experts_forward(x, ids, w, slots, [S])
    with pytest.raises(ValueError, match="out must be"):
        gpu_experts_forward(x, ids, w, slots, out=torch.empty(6, H, dtype=torch.bfloat16))


def _forbid_host_syncs(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("host sync or data-dependent shape in the decode path")
    for name in ("item", "tolist", "nonzero", "unique", "__bool__", "__int__", "__float__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    for name in ("nonzero", "unique", "unique_consecutive", "bincount", "masked_select", "argwhere"):
        monkeypatch.setattr(torch, name, boom)


@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_path_has_no_host_sync(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    slots, _ = make_slots(fmt)
    x, ids, w = routing_with_holes()
    ref = expected(slots, x, ids, w)
    with monkeypatch.context() as m:
        _forbid_host_syncs(m)
        out = gpu_experts_forward(x, ids, w, slots, [0, 1, 2, 3])
        with pytest.raises(AssertionError, match="host sync"):   # the patch does catch the prefill path
            gpu_experts_forward(x, ids, w, slots, path="prefill")
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_path_runs_on_meta_tensors(fmt: str) -> None:
    """Meta tensors carry no data: any sync or data-dependent shape would raise."""
    slots = SlotWeights.allocate(S, H, I, fmt, "meta")
    x = torch.empty(3, H, dtype=torch.bfloat16, device="meta")
    ids = torch.empty(3, 2, dtype=torch.int32, device="meta")
    w = torch.empty(3, 2, device="meta")
    out = gpu_experts_forward(x, ids, w, slots, [0, 2], path="decode")
    assert out.device.type == "meta" and out.shape == (3, H) and out.dtype == torch.float32


# ----------------------------------------------------------------------------- triton


def _need_triton(device: str) -> None:
    if not triton_available(device):
        pytest.skip(f"triton is not installed or cannot run on {device} "
                    "(CPU needs TRITON_INTERPRET=1 before the kernels are built)")


@pytest.mark.parametrize("fmt", FORMATS)
def test_triton_matches_torch_path(fmt: str) -> None:
    _need_triton(DEVICE)
    slots, _ = make_slots(fmt, device=DEVICE)
    x, ids, w = (t.to(DEVICE) for t in routing_with_holes(n=4))
    ref = gpu_experts_forward(x, ids, w, slots, path="prefill")
    out = triton_experts_forward(x, ids, w, slots)
    assert out.dtype == torch.float32 and out.shape == (4, H)
    assert rel_err(out, ref) < 1e-2
    assert rel_err(out.cpu(), expected(slots, x, ids, w)) < 1e-2
    assert torch.all(out[3] == 0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_triton_ragged_shapes_and_small_tiles(fmt: str) -> None:
    """Dims that are not tile multiples (masks), several tiles and int4 groups per row, an out buffer."""
    _need_triton(DEVICE)
    h, i = (48, 80) if fmt != "int4" else (64, 96)
    slots, _ = make_slots(fmt, h=h, i=i, device=DEVICE, group=32)
    x, ids, w = (t.to(DEVICE) for t in routing_with_holes(n=3, h=h, seed=5))
    buf = torch.full((3, h), 7.0, device=DEVICE)
    out = triton_experts_forward(x.float(), ids, w, slots, out=buf, block_out=16, block_in=16)
    assert out is buf
    assert rel_err(out.cpu(), expected(slots, x.float(), ids, w)) < 1e-2


# ----------------------------------------------------------------------------- cuda


@pytest.mark.gpu
def test_everything_on_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: torch sees no GPU on this machine")
    for fmt in FORMATS:
        slots, _ = make_slots(fmt, s=8, h=256, i=512, device="cuda")
        x, ids, w = routing_with_holes(n=6, h=256)
        ids = torch.where(ids >= 0, ids + 4, ids)                                 # slots 4..7 too
        ref = expected(slots, x, ids, w)
        x, ids, w = x.cuda(), ids.cuda(), w.cuda()
        gpu_experts_forward(x, ids, w, slots, [4, 5, 6, 7])                        # warm-up allocations
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            dec = gpu_experts_forward(x, ids, w, slots, [4, 5, 6, 7])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        pre = gpu_experts_forward(x, ids, w, slots, path="prefill")
        assert rel_err(dec.cpu(), ref) < 1e-2 and rel_err(pre.cpu(), ref) < 1e-2, fmt
        if triton_available("cuda"):
            tri = triton_experts_forward(x, ids, w, slots)
            assert rel_err(tri.cpu(), ref) < 1e-2, fmt
