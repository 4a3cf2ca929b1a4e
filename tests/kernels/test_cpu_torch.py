from __future__ import annotations

import pytest
import torch

from hybrimoe_kt.kernels.cpu_torch import TorchCpuBackend
from kernel_helpers import reference, rel_err, routing, tiny_experts


@pytest.mark.parametrize("n,k", [(1, 2), (5, 2), (7, 3)])
def test_matches_per_token_reference(n: int, k: int) -> None:
    gate, up, down = tiny_experts()
    be = TorchCpuBackend(gate, up, down, 1)
    x, ids, w = routing(n, k, 4, 64)
    out = be.forward(x, ids, w)
    assert out.dtype == torch.bfloat16 and out.shape == (n, 64)
    assert rel_err(out, reference(gate, up, down, x, ids, w)) < 1e-2


def test_skips_negative_ids_and_masked_experts() -> None:
    gate, up, down = tiny_experts()
    be = TorchCpuBackend(gate, up, down, 1)
    x, ids, w = routing(6, 2, 4, 64)
    ids[0, 0] = -1
    ids[1, :] = -1                      # a token with no CPU expert gets zeros
    be.gpu_mask[int(ids[2, 0])] = True  # in place: the GPU serves this expert
    out = be.forward(x, ids, w)
    ref = reference(gate, up, down, x, ids, w, mask=be.gpu_mask)
    assert rel_err(out, ref) < 1e-2
    assert torch.all(out[1] == 0)
    be.gpu_mask.fill_(True)
    assert torch.all(be.forward(x, ids, w) == 0)


def test_submit_sync_writes_given_output() -> None:
    gate, up, down = tiny_experts()
    be = TorchCpuBackend(gate, up, down, 1)
    x, ids, w = routing(3, 2, 4, 64)
    out = torch.full((3, 64), 7.0, dtype=torch.bfloat16)
    be.submit(x, ids, w, out)
    be.sync()
    assert rel_err(out, reference(gate, up, down, x, ids, w)) < 1e-2


@pytest.mark.parametrize("bad", ["dtype", "shape", "id"])
def test_bad_inputs_raise_value_error(bad: str) -> None:
    gate, up, down = tiny_experts()
    be = TorchCpuBackend(gate, up, down, 1)
    x, ids, w = routing(3, 2, 4, 64)
    if bad == "dtype":
        x = x.float()
    elif bad == "shape":
        w = w[:, :1]
    else:
        ids[0, 0] = 4
    with pytest.raises(ValueError):
        be.forward(x, ids, w)


def test_bad_weights_raise_value_error() -> None:
    gate, up, down = tiny_experts()
    with pytest.raises(ValueError, match="down must be"):
        TorchCpuBackend(gate, up, down.transpose(1, 2), 1)
    with pytest.raises(ValueError, match="bfloat16"):
        TorchCpuBackend(gate.float(), up, down, 1)
