"""The GGUF store's pinned layout (``GgufExpertStore(pin=True)``): the blocks of a GGUF file move out of the
file mapping into one buffer per layer and projection, byte for byte, and the store keeps only those
(host bytes = the file's expert bytes); the CPU kernels and the slot copies read those buffers, with the
same results; a CUDA tier asks for it. Page-locking itself needs CUDA: without it the layout is built
with pageable buffers (``host_buffer``), the page-locked allocator's registrations are checked against a
recording stand-in for the CUDA runtime, and real DMA from it on a GPU (marked ``gpu``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hybrimoe_kt.kernels.gguf_experts import GgufExperts, GgufLayerExperts, GgufTensor
from hybrimoe_kt.kt.gguf_io import read_gguf_experts
from hybrimoe_kt.runtime import page_locked
from hybrimoe_kt.runtime.device import Tier
from hybrimoe_kt.runtime.store_gguf import GgufExpertStore

REPO = Path(__file__).resolve().parents[2]
L, E, H, I, K = 2, 4, 256, 256, 2
TYPES = ("Q4_K", "Q8_0", "Q6_K")  # gate, up, down: a Q4_K_M-like mix


def write_experts_gguf(path: Path) -> Path:
    """A GGUF file holding only the routed experts of ``L`` MoE layers."""
    from gguf import GGMLQuantizationType, GGUFWriter

    gen = torch.Generator().manual_seed(21)
    writer = GGUFWriter(str(path), "qwen2moe")
    for layer in range(L):
        lx = GgufLayerExperts.quantize(torch.randn(E, I, H, generator=gen) * H ** -0.5,
                                       torch.randn(E, I, H, generator=gen) * H ** -0.5,
                                       torch.randn(E, H, I, generator=gen) * I ** -0.5, TYPES)
        for proj, t in zip(("gate", "up", "down"), (lx.gate, lx.up, lx.down)):
            writer.add_tensor(f"blk.{layer}.ffn_{proj}_exps.weight", t.data,
                              raw_dtype=GGMLQuantizationType[t.type_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class Buffers:
    """Pageable stand-in for the page-locked allocator: hands out numpy buffers and remembers them."""

    def __init__(self) -> None:
        self.given: list[np.ndarray] = []

    def __call__(self, nbytes: int) -> np.ndarray:
        buf = np.empty(nbytes, dtype=np.uint8)
        self.given.append(buf)
        return buf

    def owner_of(self, a: np.ndarray) -> int:
        """Index of the one buffer ``a`` lies in (asserts there is exactly one)."""
        hits = [i for i, b in enumerate(self.given) if np.shares_memory(a, b)]
        assert len(hits) == 1, f"array lies in {len(hits)} of the store's buffers"
        return hits[0]


def projections(lx: GgufLayerExperts) -> tuple[GgufTensor, GgufTensor, GgufTensor]:
    return lx.gate, lx.up, lx.down


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_experts_gguf(tmp_path_factory.mktemp("pinned") / "experts.gguf")


def test_pinned_layout_holds_the_files_blocks_once(gguf_file: Path) -> None:
    experts = GgufExperts.from_tensors(read_gguf_experts(gguf_file))
    file_bytes = sum(t.data.nbytes for lx in experts.layers.values() for t in projections(lx))
    buffers = Buffers()
    store = GgufExpertStore(experts, pin=True, host_buffer=buffers)
    assert store.pinned and len(buffers.given) == 3 * L  # one buffer per layer and projection
    host = sum(b.nbytes for b in buffers.given)
    assert host <= 1.05 * file_bytes and host == store.quantized_bytes()
    owners = set()
    for layer, lx in enumerate(store.layers):
        assert lx.types == TYPES
        for t, src in zip(projections(lx), projections(experts.layer(layer))):
            owners.add(buffers.owner_of(t.data))
            assert not np.shares_memory(t.data, src.data)  # nothing left in the file mapping
            assert np.array_equal(t.data, src.data)
        for e in range(E):
            types, blocks = store.expert_blocks(layer, e)
            assert types == TYPES
            for b, src in zip(blocks, projections(experts.layer(layer))):
                assert torch.equal(b, torch.from_numpy(np.array(src.data[e])))  # the file's bytes
                buffers.owner_of(b.numpy())  # a view of the store's buffer, not a copy
    assert len(owners) == 3 * L


@pytest.mark.parametrize("kind", ["torch", "auto"])
def test_cpu_tier_reads_the_pinned_layout_with_unchanged_output(gguf_file: Path, kind: str) -> None:
    experts = GgufExperts.from_tensors(read_gguf_experts(gguf_file))
    mapped = GgufExpertStore(experts)
    pinned = GgufExpertStore(experts, pin=True, host_buffer=Buffers())
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, H, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(5)])
    w = torch.softmax(torch.randn(5, K, generator=gen), -1)
    for layer in range(L):
        want = mapped.cpu_backend(layer, kind, 1, K, 16).forward(x, ids, w)
        backend = pinned.cpu_backend(layer, kind, 1, K, 16)
        got = backend.forward(x, ids, w)
        assert torch.equal(got, want), (kind, layer, backend.name)
        assert float(want.abs().max()) > 0


def test_slot_copies_from_the_pinned_layout_are_the_files_bytes(gguf_file: Path) -> None:
    experts = GgufExperts.from_tensors(read_gguf_experts(gguf_file))
    mapped = GgufExpertStore(experts)
    pinned = GgufExpertStore(experts, pin=True, host_buffer=Buffers())
    a, b = mapped.make_slots(2, "cpu"), pinned.make_slots(2, "cpu")
    assert pinned.expert_bytes() == mapped.expert_bytes()
    a.write_blocks(0, *mapped.expert_blocks(1, 3))
    b.write_blocks(0, *pinned.expert_blocks(1, 3))
    assert all(torch.equal(x, y) for x, y in zip(a.data, b.data))
    assert all(torch.equal(x, y) for x, y in zip(b.dequant_slot(0, torch.bfloat16), pinned.expert(1, 3)))


class FakeCudart:
    """Records ``cudaHostRegister`` / ``cudaHostUnregister`` calls in place of the CUDA runtime."""

    def __init__(self, register_error: int = 0) -> None:
        self.registered: dict[int, tuple[int, int]] = {}
        self.unregistered: list[int] = []
        self.register_error = register_error

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:  # noqa: N802 (CUDA's name)
        if not self.register_error:
            self.registered[ptr] = (size, flags)
        return self.register_error

    def cudaHostUnregister(self, ptr: int) -> int:  # noqa: N802
        self.unregistered.append(ptr)
        return 0


@pytest.fixture
def fake_cudart(monkeypatch: pytest.MonkeyPatch) -> FakeCudart:
    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    return fake


def test_page_locked_buffer_registers_its_exact_bytes_until_its_last_view_dies(fake_cudart: FakeCudart) -> None:
    import gc

    buf = page_locked.page_locked_buffer(10_000)
    ptr = buf.ctypes.data
    assert buf.dtype == np.uint8 and buf.shape == (10_000,) and buf.flags.writeable
    assert ptr % page_locked.PAGE == 0
    assert fake_cudart.registered == {ptr: (10_000, page_locked.HOST_REGISTER_PORTABLE)}
    view = torch.from_numpy(buf.reshape(100, 100)[3])  # as expert_blocks hands out
    del buf
    gc.collect()
    assert fake_cudart.unregistered == []  # still read through the view
    del view
    gc.collect()
    assert fake_cudart.unregistered == [ptr]


def test_page_locked_register_failure_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart(register_error=2))
    with pytest.raises(RuntimeError, match="cudaHostRegister of 4096 host bytes failed with cudaError 2"):
        page_locked.page_locked_buffer(4096)


def test_pinned_store_registers_one_buffer_per_layer_and_projection(gguf_file: Path,
                                                                    fake_cudart: FakeCudart) -> None:
    experts = GgufExperts.from_tensors(read_gguf_experts(gguf_file))
    store = GgufExpertStore(experts, pin=True)
    sizes = sorted(size for size, _ in fake_cudart.registered.values())
    assert sizes == sorted(t.data.nbytes for lx in store.layers for t in projections(lx))
    starts = {t.data.ctypes.data for lx in store.layers for t in projections(lx)}
    assert starts == set(fake_cudart.registered)  # the store's blocks are the registered bytes


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_pinning_without_cuda_is_a_clear_error(gguf_file: Path) -> None:
    experts = GgufExperts.from_tensors(read_gguf_experts(gguf_file))
    with pytest.raises(RuntimeError, match="pinned\\) host memory needs CUDA"):
        GgufExpertStore(experts, pin=True)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        page_locked.page_locked_buffer(4096)


def test_bad_host_buffers_are_refused(gguf_file: Path) -> None:
    experts = GgufExperts.from_tensors(read_gguf_experts(gguf_file))
    with pytest.raises(ValueError, match="pass it with pin=True"):
        GgufExpertStore(experts, host_buffer=Buffers())
    with pytest.raises(ValueError, match="must be a writeable contiguous uint8"):
        GgufExpertStore(experts, pin=True, host_buffer=lambda n: np.empty(n + 1, dtype=np.uint8))
    with pytest.raises(ValueError, match="must be a writeable contiguous uint8"):
        GgufExpertStore(experts, pin=True, host_buffer=lambda n: np.empty(n // 2, dtype=np.uint16))


def test_a_cuda_tier_asks_for_the_pinned_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``attach_runtime`` pins the GGUF store when the tier can pin (``Tier.pin_ok``: CUDA). Without a GPU
    the CPU stand-in is made to answer yes and the page-locked allocator is replaced by pageable buffers;
    the model's logits stay those of the store left in the file mapping."""
    from hybrimoe_kt.kt.loader import load_hybrid
    from hybrimoe_kt.kt.tiny import make_tiny_model

    model = Path(make_tiny_model("qwen2-moe", tmp_path / "m", seed=3, gguf=True)["dir"])
    rules = REPO / "optimize_rules" / "Qwen2-MoE-hybrimoe.yaml"
    plain = load_hybrid(model, rules, progress=False, gguf_path=model / "model.gguf")
    assert not plain.runtime.store.pinned  # the stand-in cannot pin: the blocks stay in the mapping
    ids = plain.tokenizer("the pinned store", return_tensors="pt").input_ids
    with torch.no_grad():
        want = plain.model(ids).logits

    buffers = Buffers()
    monkeypatch.setattr(Tier, "pin_ok", lambda self: True)
    monkeypatch.setattr(page_locked, "page_locked_buffer", buffers)
    hm = load_hybrid(model, rules, progress=False, gguf_path=model / "model.gguf")
    store = hm.runtime.store
    assert isinstance(store, GgufExpertStore) and store.pinned
    assert len(buffers.given) == 3 * store.n_layers
    for lx in store.layers:
        for t in projections(lx):
            buffers.owner_of(t.data)
    with torch.no_grad():
        got = hm.model(ids).logits
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_page_locked_store_serves_real_dma(gguf_file: Path) -> None:
    experts = GgufExperts.from_tensors(read_gguf_experts(gguf_file))
    store = GgufExpertStore(experts, pin=True)
    _, blocks = store.expert_blocks(0, 1)
    assert all(b.is_pinned() for b in blocks)
    slots = store.make_slots(1, "cuda")
    slots.write_blocks(0, *store.expert_blocks(0, 1), non_blocking=True)
    torch.cuda.synchronize()
    assert all(torch.equal(d[0, :, : b.shape[1]].cpu(), b) for d, b in zip(slots.data, blocks))


def test_bf16_store_copies_into_exact_size_page_locked_buffers() -> None:
    """The bf16 store from a model's weights (``HostExpertStore.page_locked``): byte-identical copies, one
    buffer of exactly each tensor's bytes, and the CPU tier's output unchanged."""
    import numpy as np

    from hybrimoe_kt.runtime.store import HostExpertStore

    src = HostExpertStore.random(2, 4, 64, 32, seed=1)
    sizes: list[int] = []

    def alloc(n: int) -> np.ndarray:
        sizes.append(n)
        return np.empty(n, dtype=np.uint8)

    pinned = HostExpertStore.page_locked(src.layers, alloc=alloc)
    assert sizes == [t.numel() * 2 for lw in src.layers for t in (lw.gate, lw.up, lw.down)]
    for a, b in zip(src.layers, pinned.layers):
        for x, y in zip((a.gate, a.up, a.down), (b.gate, b.up, b.down)):
            assert torch.equal(x, y) and x.data_ptr() != y.data_ptr() and y.is_contiguous()
    assert pinned.nbytes() == src.nbytes()
    x = torch.randn(3, 64).to(torch.bfloat16)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2]])
    w = torch.full((3, 2), 0.5)
    outs = []
    for store in (src, pinned):
        b = store.cpu_backend(0, "torch", 1, 2, 8)
        out = torch.empty(3, 64, dtype=torch.bfloat16)
        b.submit(x, ids, w, out)
        b.sync()
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
