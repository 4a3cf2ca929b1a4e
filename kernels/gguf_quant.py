"""GGUF block quantisation in numpy, for routed expert weights.

The ``gguf`` package (0.19) quantises Q8_0 and BF16 but only dequantises the K-quants, so this module
writes Q4_K, Q5_K and Q6_K blocks itself and hands every other type to ``gguf.quants``. Its output is
checked by round trips through ``gguf.quants.dequantize`` (the format reference). Clear, not fast.

Rows are quantised along the last axis in super-blocks of ``QK_K = 256`` values:

- Q4_K (144 bytes): fp16 ``d``, fp16 ``dmin``, 12 bytes of packed 6-bit scales ``sc[8]`` and mins
  ``mn[8]`` (one per sub-block of 32), 128 bytes of 4-bit codes; ``w = d*sc*q - dmin*mn``, q in 0..15.
  Scale bytes 0..3 hold sc[0..3] in bits 0..5 and bits 4..5 of sc[4..7] in bits 6..7; bytes 4..7 the
  same for the mins; bytes 8..11 hold the low 4 bits of sc[4..7] (low nibble) and mn[4..7] (high).
  Code byte ``32c + l`` holds sub-block 2c (low nibble) and 2c + 1 (high nibble) at position l.
- Q5_K (176 bytes): as Q4_K plus 32 bytes ``qh`` between scales and codes: bit j of ``qh[l]`` is the
  fifth bit of sub-block j's code at position l; q in 0..31.
- Q6_K (210 bytes): 128 bytes low nibbles ``ql``, 64 bytes high 2-bit pairs ``qh``, 16 int8 scales
  (one per 16 values), fp16 ``d``; ``w = d*scale*(q - 32)``, q in 0..63. Value ``128h + 32r + l``
  keeps its low nibble in ``ql[64h + 32(r % 2) + l]`` (low nibble if r < 2, else high) and its high
  two bits in bits 2r..2r+1 of ``qh[32h + l]``.
"""

from __future__ import annotations

import numpy as np

QK_K = 256                       # values per K-quant super-block
K_QUANT_TYPES = ("Q4_K", "Q5_K", "Q6_K")


def _fp16(v: np.ndarray) -> np.ndarray:
    """Round to float16 and back: the scale the decoder will actually use."""
    return v.astype(np.float16).astype(np.float32)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, 0 where b == 0."""
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape, np.float32), where=b != 0)


def _affine_k(x: np.ndarray, nmax: int) -> tuple[np.ndarray, ...]:
    """Shared Q4_K/Q5_K step. x [B, 256] -> d [B], dmin [B], sc [B, 8], mn [B, 8], q [B, 8, 32].

    Each sub-block of 32 maps its [min(lo, 0), hi] range onto codes 0..nmax; the per-sub-block scales
    and offsets are then themselves quantised to 6 bits against the super-block's ``d`` / ``dmin``.
    """
    sub = x.reshape(-1, 8, 32)                           # [B, 8, 32]
    lo = np.minimum(sub.min(axis=-1), 0.0)               # [B, 8], <= 0 so the offset is >= 0
    scale = (sub.max(axis=-1) - lo) / nmax               # [B, 8]
    offset = -lo                                         # [B, 8]
    d = _fp16(scale.max(axis=-1) / 63.0)                 # [B]
    dmin = _fp16(offset.max(axis=-1) / 63.0)             # [B]
    sc = np.clip(np.rint(_safe_div(scale, d[:, None])), 0, 63).astype(np.uint8)    # [B, 8]
    mn = np.clip(np.rint(_safe_div(offset, dmin[:, None])), 0, 63).astype(np.uint8)  # [B, 8]
    eff_scale = (d[:, None] * sc)[..., None]             # [B, 8, 1]
    eff_offset = (dmin[:, None] * mn)[..., None]         # [B, 8, 1]
    q = np.clip(np.rint(_safe_div(sub + eff_offset, eff_scale)), 0, nmax).astype(np.uint8)
    return d, dmin, sc, mn, q


def _pack_scales_k(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """sc, mn [B, 8] 6-bit -> the 12-byte packed layout [B, 12]."""
    b0 = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    b1 = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    b2 = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([b0, b1, b2], axis=1).astype(np.uint8)


def _pack_nibbles_k(q: np.ndarray) -> np.ndarray:
    """q [B, 8, 32] (low 4 bits used) -> [B, 128]: sub-blocks 2c / 2c + 1 share bytes 32c..32c+31."""
    q = (q & 0x0F).reshape(-1, 4, 2, 32)
    return (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(-1, 128).astype(np.uint8)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """[B] float -> [B, 2] little-endian float16 bytes."""
    return v.astype("<f2").reshape(-1, 1).view(np.uint8)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """x [B, 256] float32 -> Q4_K blocks [B, 144] uint8."""
    d, dmin, sc, mn, q = _affine_k(x, 15)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_k(sc, mn),
                           _pack_nibbles_k(q)], axis=1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """x [B, 256] float32 -> Q5_K blocks [B, 176] uint8."""
    d, dmin, sc, mn, q = _affine_k(x, 31)
    fifth = (q >> 4) & 1                                         # [B, 8, 32]
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)              # [B, 32]
    for j in range(8):
        qh |= (fifth[:, j, :] << j).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_k(sc, mn), qh,
                           _pack_nibbles_k(q)], axis=1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """x [B, 256] float32 -> Q6_K blocks [B, 210] uint8 (symmetric, 16 sub-blocks of 16)."""
    sub = x.reshape(-1, 16, 16)                                  # [B, 16, 16]
    scale = np.abs(sub).max(axis=-1) / 31.0                      # [B, 16]
    d = _fp16(scale.max(axis=-1) / 127.0)                        # [B]
    sc = np.clip(np.rint(_safe_div(scale, d[:, None])), -128, 127).astype(np.int8)  # [B, 16]
    eff = (d[:, None] * sc)[..., None]                           # [B, 16, 1]
    q = np.clip(np.rint(_safe_div(sub, eff)), -32, 31).astype(np.int16) + 32
    u = q.astype(np.uint8).reshape(-1, 2, 4, 32)                 # [B, half h, r, l]
    low = u & 0x0F
    ql = (low[:, :, 0:2, :] | (low[:, :, 2:4, :] << 4)).reshape(-1, 128)
    high = u >> 4                                                # [B, 2, 4, 32], 2 bits each
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6))
    return np.concatenate([ql.astype(np.uint8), qh.reshape(-1, 64).astype(np.uint8),
                           sc.view(np.uint8), _f16_bytes(d)], axis=1)


_K_QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def quantize(x: np.ndarray, type_name: str) -> np.ndarray:
    """x [..., n] float -> uint8 [..., bytes per row] in the GGUF type ``type_name`` (e.g. "Q4_K").

    K-quants need n % 256 == 0 and are written here; other types go to ``gguf.quants.quantize``.
    """
    from gguf import GGMLQuantizationType, quants

    name = type_name.upper()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if name in _K_QUANTIZERS:
        n = x.shape[-1]
        if n % QK_K:
            raise ValueError(f"{name} needs rows that are a multiple of {QK_K} values, got {n}")
        blocks = _K_QUANTIZERS[name](x.reshape(-1, QK_K))        # [rows * n/256, bytes]
        return blocks.reshape(*x.shape[:-1], -1)
    try:
        qtype = GGMLQuantizationType[name]
    except KeyError:
        raise ValueError(f"unknown GGUF type {type_name!r}") from None
    return quants.quantize(x, qtype)


def dequantize(data: np.ndarray, type_name: str) -> np.ndarray:
    """uint8 [..., bytes per row] -> float32 [..., n], through ``gguf.quants.dequantize``."""
    from gguf import GGMLQuantizationType, quants

    return np.asarray(quants.dequantize(data, GGMLQuantizationType[type_name.upper()]),
                      dtype=np.float32)
