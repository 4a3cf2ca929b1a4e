"""Device placement of the whole hybrid model on a GPU, checked without one: torch's FakeTensorMode
makes fake ``cuda`` tensors on a CPU-only torch and raises on any op that mixes devices.

Every tiny family runs through its shipped rule files (hybrimoe and stock, devices rewritten to
``cuda``) for a prefill and a few decode steps. The boundary: the model, the GPU slot pool and the GPU
experts run on fake CUDA tensors; the host side stays real - weights are read into real host memory,
the routed experts' host store and the CPU expert kernels are real, and the runtime's host transfers
(``_host`` in ``runtime/moe.py``) hand the CPU tier real placeholders (zero activations, routing ids
``0..k-1``) for the fake tensors they are given. Streams and events use the stand-in
(``runtime.device.Tier`` on a fake CUDA device).

The shim ``_fake_cuda_bindings``: on a CPU-only torch a few Python bindings (``Tensor.__getitem__``,
``__setitem__``, ``contiguous``, ``copy_``, ``masked_fill`` with a Python scalar, ``~``) take a CUDA
device guard before dispatch and fail with "not linked with support for cuda devices" even on fake tensors. The shim gives those
methods of ``FakeTensor`` (only) equivalents that go through the dispatcher (views through
``as_strided``, computed on meta tensors); a host<->device ``copy_`` checks shapes only (there is no
data). Every other op runs as torch runs it, so a device mismatch anywhere still raises.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, Iterator

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from torch._subclasses.fake_tensor import (FakeTensor, FakeTensorDeviceMismatchError, FakeTensorMode,  # noqa: E402
                                          unset_fake_temporarily)

from hybrimoe_kt.kt.families import FAMILIES  # noqa: E402
from hybrimoe_kt.kt.loader import load_hybrid  # noqa: E402
from hybrimoe_kt.kt.rules import RuleError  # noqa: E402
from hybrimoe_kt.kt.tiny import make_tiny_model  # noqa: E402
from tests.kt.rule_files import RULE_NAMES

ROOT = Path(__file__).resolve().parents[2]
DEV = torch.device("cuda", 0)
DECODE_STEPS = 3

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="fake CUDA checks are for machines "
                                "without a GPU (with one, run the gpu-marked tests)")


# ----------------------------------------------------------------------------- shim


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="meta")


def _meta_index(i: Any) -> Any:
    if isinstance(i, torch.Tensor):
        return _meta_like(i)
    if isinstance(i, (tuple, list)) and not all(isinstance(v, int) for v in i):
        return type(i)(_meta_index(v) for v in i)
    return i


def _has_tensor(i: Any) -> bool:
    if isinstance(i, torch.Tensor):
        return True
    return isinstance(i, (tuple, list)) and any(_has_tensor(v) for v in i)


def _check_index_devices(self: torch.Tensor, idx: Any) -> None:
    items = idx if isinstance(idx, (tuple, list)) else (idx,)
    for i in items:
        if isinstance(i, torch.Tensor) and i.dim() > 0 and i.device not in (self.device, torch.device("cpu")):
            raise RuntimeError(f"indexing a {self.device} tensor with a {i.device} index mixes devices")


def _getitem(self: torch.Tensor, idx: Any) -> torch.Tensor:
    _check_index_devices(self, idx)
    with unset_fake_temporarily():
        m = _meta_like(self)
        r = m[_meta_index(idx)]
        size, stride, offset = tuple(r.shape), tuple(r.stride()), r.storage_offset()
    if not _has_tensor(idx):  # basic indexing: a view
        return self.as_strided(size, stride, offset)
    return torch.empty(size, dtype=self.dtype, device=self.device)  # advanced indexing: a new tensor


def _setitem(self: torch.Tensor, idx: Any, value: Any) -> None:
    _check_index_devices(self, idx)
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.device != self.device:
        raise RuntimeError(f"assigning a {value.device} tensor into a {self.device} tensor mixes devices")
    with unset_fake_temporarily():
        m = _meta_like(self)
        m[_meta_index(idx)] = _meta_like(value) if isinstance(value, torch.Tensor) else value


def _contiguous(self: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    if self.is_contiguous(memory_format=memory_format):
        return self
    return torch.ops.aten.clone.default(self, memory_format=memory_format)


def _copy_(self: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    if isinstance(src, torch.Tensor) and src.device != self.device:
        torch.broadcast_shapes(tuple(src.shape), tuple(self.shape))  # host <-> device copy: shapes only
        return self
    return torch.ops.aten.copy_.default(self, src, non_blocking)


def _masked_fill(self: torch.Tensor, mask: torch.Tensor, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return torch.ops.aten.masked_fill.Tensor(self, mask, value)
    return torch.ops.aten.masked_fill.Scalar(self, mask, value)


def _invert(self: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.bitwise_not.default(self)


_PATCH = {"__invert__": _invert, "masked_fill": _masked_fill, "__getitem__": _getitem, "__setitem__": _setitem,
          "contiguous": _contiguous, "copy_": _copy_}


@contextlib.contextmanager
def _fake_cuda_bindings() -> Iterator[None]:
    old = {n: FakeTensor.__dict__.get(n) for n in _PATCH}
    for n, f in _PATCH.items():
        setattr(FakeTensor, n, f)
    try:
        yield
    finally:
        for n, o in old.items():
            if o is None:
                delattr(FakeTensor, n)
            else:
                setattr(FakeTensor, n, o)


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeTensorMode]:
    """Fake CUDA for the enclosed code: inference only (autograd cannot make CUDA grad nodes here)."""
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode, _fake_cuda_bindings():
        yield mode


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {}


def _model_dir(family: str, cache: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    if family not in cache:
        out = tmp_path_factory.mktemp(family) / "model"
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HF_HUB_OFFLINE", "1")
            mp.setenv("TRANSFORMERS_OFFLINE", "1")
            make_tiny_model(family, out, seed=3)
        cache[family] = out
    return cache[family]


def _cuda_rules(family: str, variant: str, tmp_path: Path, prefill: str = "cuda") -> Path:
    text = (ROOT / "optimize_rules" / f"{RULE_NAMES[family]}-{variant}.yaml").read_text()
    text, n_gen = re.subn(r"generate_device: cpu", "generate_device: cuda", text)
    text, n_pre = re.subn(r"prefill_device: cpu", f"prefill_device: {prefill}", text)
    assert n_gen >= 1 and n_pre >= 1, "the shipped rule file names no devices any more"
    out = tmp_path / f"{family}-{variant}-cuda.yaml"
    out.write_text(text)
    return out


def _run(model: Any, prompt_len: int = 5, steps: int = DECODE_STEPS) -> torch.Tensor:
    ids = torch.zeros(1, prompt_len, dtype=torch.long, device=DEV)   # [1, T]
    out = model(input_ids=ids, use_cache=True)                          # prefill
    past = out.past_key_values
    for _ in range(steps):                                              # decode
        nxt = out.logits[:, -1:].argmax(-1)                             # [1, 1] on the device
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
    return out.logits


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("variant", ["hybrimoe", "stock"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fake_cuda_prefill_and_decode(family: str, variant: str, model_dirs: dict[str, Path],
                                      tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    d = _model_dir(family, model_dirs, tmp_path_factory)
    rules = _cuda_rules(family, variant, tmp_path)
    with fake_cuda():
        hm = load_hybrid(d, rules, progress=False, overrides={"cpu_threads": 1})
        rt = hm.runtime
        assert rt is not None and rt.tier.is_fake and rt.tier.device == DEV
        for name, t in [*hm.model.named_parameters(), *hm.model.named_buffers()]:
            assert isinstance(t, FakeTensor) and t.device == DEV, f"{name} is on {t.device}"
        with unset_fake_temporarily():  # routed experts: real tensors in host memory
            for layer in range(rt.store.n_layers):
                for w in rt.store.expert(layer, 0):
                    assert not isinstance(w, FakeTensor) and w.device.type == "cpu"
        logits = _run(hm.model)
    assert isinstance(logits, FakeTensor) and logits.device == DEV
    assert logits.shape[:2] == (1, 1)
    st = rt.stats
    assert st.forwards == (1 + DECODE_STEPS) * rt.store.n_layers
    assert st.cpu_experts > 0                    # the real CPU tier ran
    if variant == "hybrimoe":
        assert st.gpu_experts > 0                # and the fake GPU tier
    else:
        assert st.gpu_experts == 0


def test_fake_cuda_catches_a_model_left_on_the_host(model_dirs: dict[str, Path], tmp_path: Path,
                                                    tmp_path_factory: pytest.TempPathFactory,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The check has teeth: without the loader's placement the first op mixing devices raises."""
    import hybrimoe_kt.kt.loader as loader

    d = _model_dir("mixtral", model_dirs, tmp_path_factory)
    monkeypatch.setattr(loader, "place_model", lambda model, device: None)
    with fake_cuda():
        hm = load_hybrid(d, _cuda_rules("mixtral", "hybrimoe", tmp_path), progress=False,
                         overrides={"cpu_threads": 1})
        with pytest.raises(FakeTensorDeviceMismatchError):
            _run(hm.model, steps=0)


def test_fake_cuda_operator_returns_on_its_input_device(model_dirs: dict[str, Path], tmp_path: Path,
                                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    """An MoE block given fake CUDA hidden states returns them on that device, in their dtype."""
    from hybrimoe_kt.kt.operators import HybriMoEBlock

    d = _model_dir("qwen2-moe", model_dirs, tmp_path_factory)
    with fake_cuda():
        hm = load_hybrid(d, _cuda_rules("qwen2-moe", "hybrimoe", tmp_path), progress=False,
                         overrides={"cpu_threads": 1})
        block = next(m for m in hm.model.modules() if isinstance(m, HybriMoEBlock))
        x = torch.empty(1, 3, hm.runtime.store.hidden, device=DEV)
        y = block(x)
    assert isinstance(y, FakeTensor) and y.device == DEV and y.dtype == x.dtype and y.shape == x.shape


def test_prefill_device_differing_from_generate_device_is_refused(model_dirs: dict[str, Path], tmp_path: Path,
                                                                  tmp_path_factory: pytest.TempPathFactory) -> None:
    d = _model_dir("mixtral", model_dirs, tmp_path_factory)
    with pytest.raises(RuleError, match="one device for prefill and generate is supported for now"):
        load_hybrid(d, _cuda_rules("mixtral", "hybrimoe", tmp_path, prefill="cpu"), progress=False)


def test_fake_cuda_batched_decode(model_dirs: dict[str, Path], tmp_path: Path,
                                  tmp_path_factory: pytest.TempPathFactory) -> None:
    """The server's batched decode (requests of different lengths joining and leaving) keeps every
    tensor on the model's device."""
    from hybrimoe_kt.decoding.batch import DecodeBatch, prefill

    d = _model_dir("deepseek-v2", model_dirs, tmp_path_factory)
    with fake_cuda():
        hm = load_hybrid(d, _cuda_rules("deepseek-v2", "hybrimoe", tmp_path), progress=False,
                         overrides={"cpu_threads": 1})
        batch = DecodeBatch(hm.model)
        for n in (5, 2, 7):
            logits, cache = prefill(hm.model, [0] * n)
            assert isinstance(logits, FakeTensor) and logits.device == DEV
            batch.add(cache, n)
        out = batch.step([1, 2, 3])
        batch.remove([2])
        out2 = batch.step([1, 2])
    assert isinstance(out, FakeTensor) and out.device == DEV and out.shape[0] == 3
    assert out2.shape[0] == 2 and batch.lengths == [7, 4] and batch.width == 7
