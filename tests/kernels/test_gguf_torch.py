"""The torch GGUF dequantizers match gguf.quants.dequantize value for value, for every slot type."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrimoe_kt.kernels import gguf_quant
from hybrimoe_kt.kernels.gguf_torch import GGUF_SLOT_TYPES, dequantize


@pytest.mark.parametrize("type_name", GGUF_SLOT_TYPES)
@pytest.mark.parametrize("scale", [0.02, 3.0])
def test_torch_dequant_equals_gguf(type_name: str, scale: float) -> None:
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((3, 5, 512)) * scale).astype(np.float32)
    w[0, 0, :40] = 0.0  # a block of zeros (scale 0)
    data = gguf_quant.quantize(w, type_name)                      # uint8 [3, 5, row bytes]
    want = gguf_quant.dequantize(data, type_name)                 # float32 [3, 5, 512]
    got = dequantize(torch.from_numpy(np.ascontiguousarray(data)), type_name)
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape
    np.testing.assert_array_equal(got.numpy(), want)


def test_bad_input_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="multiple of 34 bytes"):
        dequantize(torch.zeros(4, 33, dtype=torch.uint8), "Q8_0")
    with pytest.raises(ValueError, match="no torch dequantizer"):
        dequantize(torch.zeros(4, 34, dtype=torch.uint8), "Q2_K")
