"""GGUF block dequantization in torch, on any device: the GPU slots hold an expert's raw GGUF blocks and
these turn them into weights right before the matrix products (dequant-then-GEMM).

Each function takes uint8 ``[..., row bytes]`` (whole blocks per row) and returns float32 ``[..., n]``,
value for value what ``gguf.quants.dequantize`` gives (tests/kernels/test_gguf_torch.py). Block layouts
(ggml's): Q8_0 = fp16 d + 32 int8; Q4_K = fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins for eight
sub-blocks of 32, 128 bytes of nibbles; Q5_K = the same plus 32 bytes of fifth bits; Q6_K = 128 bytes of
low nibbles, 64 of high bit pairs, 16 int8 scales, fp16 d; BF16 = two bytes per value.
"""

from __future__ import annotations

import torch

QK_K = 256
BLOCK_BYTES = {"Q8_0": (32, 34), "Q4_K": (QK_K, 144), "Q5_K": (QK_K, 176), "Q6_K": (QK_K, 210), "BF16": (1, 2)}
GGUF_SLOT_TYPES = tuple(BLOCK_BYTES)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2] (little endian) -> float32 [...]."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _blocks(data: torch.Tensor, type_name: str) -> tuple[torch.Tensor, tuple[int, ...], int]:
    per, nbytes = BLOCK_BYTES[type_name]
    if data.dtype != torch.uint8 or data.shape[-1] % nbytes:
        raise ValueError(f"{type_name} rows must be uint8 with a multiple of {nbytes} bytes, got "
                         f"{data.dtype} {tuple(data.shape)}")
    lead = tuple(data.shape[:-1])
    n_blocks = data.shape[-1] // nbytes
    return data.reshape(-1, nbytes), lead, n_blocks * per


def _scale_min_k4(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit (scale, min) pairs of a K-quant super-block from its 12 packed bytes [B, 12]."""
    s = sc.to(torch.int32)
    lo_sc, lo_m = s[:, 0:4] & 63, s[:, 4:8] & 63
    hi_sc = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    hi_m = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat([lo_sc, hi_sc], 1).float(), torch.cat([lo_m, hi_m], 1).float()  # [B, 8] each


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, 0:2])                                                   # [B]
    q = b[:, 2:34].contiguous().view(torch.int8).float()                  # [B, 32]
    return d[:, None] * q


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])                            # [B]
    sc, m = _scale_min_k4(b[:, 4:16])                                     # [B, 8]
    qs = b[:, 16:144].to(torch.int32).reshape(-1, 4, 32)                  # [B, 4 chunks, 32]
    q = torch.stack([qs & 0xF, qs >> 4], 2).reshape(-1, 8, 32).float()    # [B, 8 sub-blocks, 32]
    return (d[:, None, None] * sc[:, :, None] * q - dmin[:, None, None] * m[:, :, None]).reshape(-1, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _scale_min_k4(b[:, 4:16])
    qh = b[:, 16:48].to(torch.int32)                                      # [B, 32]
    qs = b[:, 48:176].to(torch.int32).reshape(-1, 4, 32)                  # [B, 4, 32]
    bit = torch.arange(8, device=b.device, dtype=torch.int32)             # sub-block j uses bit j of qh
    high = ((qh[:, None, :] >> bit[None, :, None]) & 1) << 4              # [B, 8, 32]
    q = torch.stack([qs & 0xF, qs >> 4], 2).reshape(-1, 8, 32) + high
    return (d[:, None, None] * sc[:, :, None] * q.float() - dmin[:, None, None] * m[:, :, None]).reshape(-1, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    ql = b[:, 0:128].to(torch.int32).reshape(-1, 2, 64)                   # [B, half, 64]
    qh = b[:, 128:192].to(torch.int32).reshape(-1, 2, 32)                 # [B, half, 32]
    sc = b[:, 192:208].contiguous().view(torch.int8).float().reshape(-1, 2, 8)  # [B, half, 8]
    d = _f16(b[:, 208:210])                                               # [B]
    lo = torch.stack([ql[:, :, :32] & 0xF, ql[:, :, 32:] & 0xF, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], 2)
    shift = torch.arange(0, 8, 2, device=b.device, dtype=torch.int32)     # quarter i: bits 2i, 2i+1 of qh
    hi = (qh[:, :, None, :] >> shift[None, None, :, None]) & 3            # [B, half, 4, 32]
    q = (lo | (hi << 4)) - 32                                             # [B, half, 4 quarters, 32]
    scale = sc.reshape(-1, 2, 4, 2)                                       # quarter i, 16-value group g
    q = q.reshape(-1, 2, 4, 2, 16).float() * scale[..., None]
    return d[:, None] * q.reshape(-1, QK_K)


def _bf16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.bfloat16).float()


_DEQUANT = {"Q8_0": _q8_0, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def dequantize(data: torch.Tensor, type_name: str) -> torch.Tensor:
    """uint8 ``[..., row bytes]`` of GGUF ``type_name`` -> float32 ``[..., values per row]``."""
    name = type_name.upper()
    if name not in BLOCK_BYTES:
        raise ValueError(f"GGUF type {type_name!r} has no torch dequantizer; supported: "
                         f"{', '.join(GGUF_SLOT_TYPES)}")
    if name == "BF16":
        if data.dtype != torch.uint8 or data.shape[-1] % 2:
            raise ValueError(f"BF16 rows must be uint8 with an even byte count, got {tuple(data.shape)}")
        return _bf16(data.reshape(-1, data.shape[-1])).reshape(*data.shape[:-1], data.shape[-1] // 2)
    blocks, lead, n = _blocks(data, name)
    return _DEQUANT[name](blocks).reshape(*lead, n)
