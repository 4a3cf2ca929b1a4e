from __future__ import annotations

import pytest
import torch

from hybrimoe_kt.kernels.cpu_torch import TorchCpuBackend
from kernel_helpers import reference, rel_err, routing, tiny_experts

pytestmark = pytest.mark.kt_kernel


@pytest.fixture(scope="module")
def kx() -> object:
    try:
        import kt_kernel.kt_kernel_ext as ext
    except Exception as e:  # ImportError or the loader's RuntimeError on an unsupported CPU
        pytest.skip(f"kt-kernel extension not importable: {type(e).__name__}: {e}")
    return ext


@pytest.mark.parametrize("n,k,max_len", [(1, 2, 16), (9, 2, 16), (20, 3, 8)])
def test_matches_torch_backend(kx: object, n: int, k: int, max_len: int) -> None:
    from hybrimoe_kt.kernels.cpu_ktkernel import KtKernelBackend

    gate, up, down = tiny_experts()
    kt = KtKernelBackend(gate, up, down, 1, top_k=3, max_len=max_len)  # n > max_len: chunked
    tb = TorchCpuBackend(gate, up, down, 1)
    x, ids, w = routing(n, k, 4, 64)
    out = kt.forward(x, ids, w)
    assert rel_err(out, tb.forward(x, ids, w)) < 1e-2
    assert rel_err(out, reference(gate, up, down, x, ids, w)) < 1e-2


def test_mask_updated_in_place_and_negative_ids(kx: object) -> None:
    from hybrimoe_kt.kernels.cpu_ktkernel import KtKernelBackend

    gate, up, down = tiny_experts()
    kt = KtKernelBackend(gate, up, down, 1, top_k=2)
    x, ids, w = routing(6, 2, 4, 64)
    ids[0, 1] = -1
    kt.gpu_mask[int(ids[3, 0])] = True
    ref = reference(gate, up, down, x, ids, w, mask=kt.gpu_mask)
    assert rel_err(kt.forward(x, ids, w), ref) < 1e-2
    kt.gpu_mask.fill_(True)
    assert torch.all(kt.forward(x, ids, w) == 0)


def test_submit_is_async_until_sync(kx: object) -> None:
    from hybrimoe_kt.kernels.cpu_ktkernel import KtKernelBackend

    gate, up, down = tiny_experts()
    kt = KtKernelBackend(gate, up, down, 1, top_k=2)
    x, ids, w = routing(4, 2, 4, 64)
    out = torch.empty(4, 64, dtype=torch.bfloat16)
    kt.submit(x.clone(), ids.clone(), w.clone(), out)  # temporaries: the backend keeps them alive
    kt.sync()
    assert rel_err(out, reference(gate, up, down, x, ids, w)) < 1e-2


def test_too_many_experts_per_token_is_value_error(kx: object) -> None:
    from hybrimoe_kt.kernels.cpu_ktkernel import KtKernelBackend

    gate, up, down = tiny_experts()
    kt = KtKernelBackend(gate, up, down, 1, top_k=2)
    x, ids, w = routing(2, 3, 4, 64)
    with pytest.raises(ValueError, match="top_k"):
        kt.forward(x, ids, w)
