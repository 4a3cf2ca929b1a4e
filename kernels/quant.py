"""Weight-only quantisation formats for GPU expert slots: bf16, int8 and int4.

Every weight matrix is ``[..., O, In]`` (output rows, input columns; leading dims such as a slot index
are carried through). Formats:

- ``bf16``: the weights as they are; no scale.
- ``int8``: symmetric, one fp32 scale per output row: ``w ~= q * scale[o]`` with ``q`` in [-127, 127].
- ``int4``: asymmetric, one fp32 scale and one fp32 offset per group of ``G`` consecutive inputs
  (``G = min(128, In)``): ``w ~= q * scale[o, g] + offset[o, g]`` with ``q`` in [0, 15]. Two values are
  packed per uint8 along the input dim: input ``2j`` in the low nibble, ``2j + 1`` in the high nibble,
  so ``data`` is ``[..., O, In / 2]``. Scale and offset per group are chosen on the host at quantisation
  time: a few clipping ratios of the group's [min, max] range, each refined by least squares on the
  assigned codes, keeping the one with the smallest squared error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

QuantFormat = Literal["bf16", "int8", "int4"]
QUANT_FORMATS: tuple[str, ...] = get_args(QuantFormat)
INT4_GROUP = 128
_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)
_LS_ITERS = 3


@dataclass(frozen=True)
class QuantTensor:
    """One quantised weight matrix (or a stack of them along leading dims)."""

    data: torch.Tensor                 # bf16 [..., O, In] | int8 [..., O, In] | uint8 [..., O, In/2]
    scale: torch.Tensor | None = None  # int8: fp32 [..., O]; int4: fp32 [..., O, In/G]; bf16: None
    offset: torch.Tensor | None = None  # int4: fp32 [..., O, In/G]; otherwise None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.data, self.scale, self.offset) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def check_format(fmt: str) -> None:
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"unknown slot format {fmt!r}; use one of {', '.join(QUANT_FORMATS)}")


def int4_group(in_dim: int, group: int = INT4_GROUP) -> int:
    """Effective int4 group size for an input dim: ``min(group, in_dim)``; validates divisibility."""
    g = min(group, in_dim)
    if in_dim % 2 or g % 2 or in_dim % g:
        raise ValueError(f"int4 needs an even input dim divisible by its group size, got in_dim={in_dim}, "
                         f"group={g}; pick a group size that divides {in_dim}")
    return g


def empty_quant(lead: tuple[int, ...], out_dim: int, in_dim: int, fmt: str, device: torch.device | str,
                group: int = INT4_GROUP) -> QuantTensor:
    """Zero-filled storage for a stack of ``[O, In]`` matrices in ``fmt``."""
    check_format(fmt)
    if fmt == "bf16":
        return QuantTensor(torch.zeros(*lead, out_dim, in_dim, dtype=torch.bfloat16, device=device))
    if fmt == "int8":
        return QuantTensor(torch.zeros(*lead, out_dim, in_dim, dtype=torch.int8, device=device),
                           torch.zeros(*lead, out_dim, dtype=torch.float32, device=device))
    g = int4_group(in_dim, group)
    return QuantTensor(torch.zeros(*lead, out_dim, in_dim // 2, dtype=torch.uint8, device=device),
                       torch.zeros(*lead, out_dim, in_dim // g, dtype=torch.float32, device=device),
                       torch.zeros(*lead, out_dim, in_dim // g, dtype=torch.float32, device=device))


def quantize(w: torch.Tensor, fmt: str, group: int = INT4_GROUP) -> QuantTensor:
    """Quantise ``w [..., O, In]`` (any float dtype) into ``fmt`` on ``w``'s device."""
    check_format(fmt)
    if fmt == "bf16":
        return QuantTensor(w.to(torch.bfloat16).contiguous())
    wf = w.float()
    if fmt == "int8":
        scale = (wf.abs().amax(-1) / 127.0).clamp(min=1e-12)                  # [..., O]
        q = (wf / scale.unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8)  # [..., O, In]
        return QuantTensor(q.contiguous(), scale.contiguous())
    g = int4_group(w.shape[-1], group)
    grouped = wf.reshape(*wf.shape[:-1], w.shape[-1] // g, g)                   # [..., O, In/G, G]
    q, scale, offset = _int4_fit(grouped)
    q = q.reshape(wf.shape).to(torch.uint8)                                      # [..., O, In]
    packed = q[..., 0::2] | (q[..., 1::2] << 4)                                  # [..., O, In/2]
    return QuantTensor(packed.contiguous(), scale.contiguous(), offset.contiguous())


def _int4_fit(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group (last dim) codes in [0, 15], scale and offset minimising the squared error."""
    lo0 = g.amin(-1, keepdim=True)                                               # [..., 1]
    hi0 = g.amax(-1, keepdim=True)                                               # [..., 1]
    mean = g.mean(-1, keepdim=True)
    best_err = best_q = best_s = best_m = None
    for r in _CLIP_RATIOS:
        s = ((hi0 - lo0) * r / 15.0).clamp(min=1e-12)
        m = lo0 * r
        for _ in range(_LS_ITERS):
            q = ((g - m) / s).round().clamp(0, 15)
            qm = q.mean(-1, keepdim=True)
            var = ((q - qm) ** 2).sum(-1, keepdim=True)
            fit = ((q - qm) * (g - mean)).sum(-1, keepdim=True) / var.clamp(min=1e-12)
            s = torch.where(var > 0, fit, s).clamp(min=1e-12)
            m = mean - s * qm
        q = ((g - m) / s).round().clamp(0, 15)
        err = ((q * s + m - g) ** 2).sum(-1, keepdim=True)
        if best_err is None:
            best_err, best_q, best_s, best_m = err, q, s, m
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_q = torch.where(better, q, best_q)
            best_s = torch.where(better, s, best_s)
            best_m = torch.where(better, m, best_m)
    return best_q, best_s.squeeze(-1), best_m.squeeze(-1)


def unpack_int4(data: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., O, In/2]`` -> codes ``[..., O, In]`` (uint8 in [0, 15])."""
    return torch.stack((data & 0xF, data >> 4), dim=-1).flatten(-2)


def dequantize(qt: QuantTensor, fmt: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Weights ``[..., O, In]`` in ``dtype`` (arithmetic in fp32, one final cast)."""
    check_format(fmt)
    if fmt == "bf16":
        return qt.data.to(dtype)
    assert qt.scale is not None
    if fmt == "int8":
        return (qt.data.float() * qt.scale.unsqueeze(-1)).to(dtype)
    assert qt.offset is not None
    q = unpack_int4(qt.data).float()                                             # [..., O, In]
    n_groups = qt.scale.shape[-1]
    q = q.reshape(*q.shape[:-1], n_groups, -1)                                   # [..., O, In/G, G]
    w = q * qt.scale.unsqueeze(-1) + qt.offset.unsqueeze(-1)
    return w.flatten(-2).to(dtype)
