"""The weights of a fixed pool of GPU expert slots for one MoE layer, in one storage format.

A slot holds one routed expert: ``gate [I, H]``, ``up [I, H]``, ``down [H, I]``, stored as bf16, int8 or
packed int4 (see ``quant.py`` for the formats). The host store quantises an expert once with
``quantize_expert`` and keeps the packed tensors ready; admitting it to slot ``s`` is then a plain copy
(``write_packed``), which can be issued on a copy stream with ``non_blocking=True`` from pinned memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybrimoe_kt.kernels.quant import (INT4_GROUP, QuantTensor, check_format, dequantize, empty_quant,
                                       quantize)


@dataclass(frozen=True)
class PackedExpert:
    """One expert's weights in a slot format, without the slot dim."""

    fmt: str
    gate: QuantTensor  # [I, H] (+ scales)
    up: QuantTensor    # [I, H] (+ scales)
    down: QuantTensor  # [H, I] (+ scales)

    def nbytes(self) -> int:
        return self.gate.nbytes() + self.up.nbytes() + self.down.nbytes()

    def pin_memory(self) -> PackedExpert:
        """A copy in pinned host memory (needs CUDA), so slot writes can be asynchronous."""
        def pin(q: QuantTensor) -> QuantTensor:
            return QuantTensor(*(None if t is None else t.pin_memory() for t in (q.data, q.scale, q.offset)))
        return PackedExpert(self.fmt, pin(self.gate), pin(self.up), pin(self.down))


def quantize_expert(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, fmt: str,
                    group: int = INT4_GROUP) -> PackedExpert:
    """Quantise one expert (``gate/up [I, H]``, ``down [H, I]``, any float dtype) into ``fmt``."""
    check_format(fmt)
    if gate.dim() != 2 or up.shape != gate.shape or tuple(down.shape) != (gate.shape[1], gate.shape[0]):
        raise ValueError(f"expected gate/up [I, H] and down [H, I], got {tuple(gate.shape)}, "
                         f"{tuple(up.shape)}, {tuple(down.shape)}")
    return PackedExpert(fmt, quantize(gate, fmt, group), quantize(up, fmt, group), quantize(down, fmt, group))


class SlotWeights:
    """``n_slots`` expert slots on one device. Weight tensors carry a leading slot dim ``S``."""

    def __init__(self, fmt: str, gate: QuantTensor, up: QuantTensor, down: QuantTensor,
                 group: int = INT4_GROUP):
        check_format(fmt)
        self.fmt = fmt
        self.group = group
        self.gate = gate  # data [S, I, H] (int4: [S, I, H/2])
        self.up = up      # data [S, I, H] (int4: [S, I, H/2])
        self.down = down  # data [S, H, I] (int4: [S, H, I/2])
        self.n_slots, self.inter = gate.data.shape[0], gate.data.shape[1]
        self.hidden = down.data.shape[1]

    @classmethod
    def allocate(cls, n_slots: int, hidden: int, inter: int, fmt: str,
                 device: torch.device | str = "cpu", group: int = INT4_GROUP) -> SlotWeights:
        """Zero-filled slots; ``group`` is the int4 group size (effective ``min(group, input dim)``)."""
        if n_slots < 1 or hidden < 1 or inter < 1:
            raise ValueError(f"n_slots, hidden and inter must be >= 1, got {n_slots}, {hidden}, {inter}")
        return cls(fmt,
                   empty_quant((n_slots,), inter, hidden, fmt, device, group),
                   empty_quant((n_slots,), inter, hidden, fmt, device, group),
                   empty_quant((n_slots,), hidden, inter, fmt, device, group),
                   group)

    @property
    def device(self) -> torch.device:
        return self.gate.data.device

    def slot_nbytes(self) -> int:
        """Bytes one expert occupies in this format (weights and scales)."""
        return (self.gate.nbytes() + self.up.nbytes() + self.down.nbytes()) // self.n_slots

    def _check_slot(self, s: int) -> None:
        if not 0 <= s < self.n_slots:
            raise IndexError(f"slot {s} out of range [0, {self.n_slots})")

    def write_packed(self, s: int, packed: PackedExpert, non_blocking: bool = False) -> None:
        """Copy an already quantised expert into slot ``s`` (the caller orders it against compute)."""
        self._check_slot(s)
        if packed.fmt != self.fmt:
            raise ValueError(f"packed expert is {packed.fmt!r} but the slots are {self.fmt!r}")
        for dst, src in ((self.gate, packed.gate), (self.up, packed.up), (self.down, packed.down)):
            for d, t in zip(dst.tensors(), src.tensors()):
                if d.shape[1:] != t.shape:
                    raise ValueError(f"packed tensor shape {tuple(t.shape)} does not fit slot shape "
                                     f"{tuple(d.shape[1:])}")
                d[s].copy_(t, non_blocking=non_blocking)

    def write_slot(self, s: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        """Quantise bf16 (or any float) expert weights into slot ``s``."""
        self.write_packed(s, quantize_expert(gate.to(self.device), up.to(self.device), down.to(self.device),
                                             self.fmt, self.group))

    def copy_slot(self, dst: int, src: int, non_blocking: bool = False) -> None:
        """Copy slot ``src`` into slot ``dst`` on the device (the caller orders it against compute)."""
        self._check_slot(dst)
        self._check_slot(src)
        for q in (self.gate, self.up, self.down):
            for t in q.tensors():
                t[dst].copy_(t[src], non_blocking=non_blocking)

    def slot(self, s: int) -> PackedExpert:
        """Views of slot ``s`` (no copy)."""
        def view(q: QuantTensor) -> QuantTensor:
            return QuantTensor(*(None if t is None else t[s] for t in (q.data, q.scale, q.offset)))
        return PackedExpert(self.fmt, view(self.gate), view(self.up), view(self.down))

    def dequant_slot(self, s: int, dtype: torch.dtype = torch.float32
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Slot ``s`` as plain weights: ``gate [I, H]``, ``up [I, H]``, ``down [H, I]`` in ``dtype``."""
        self._check_slot(s)
        p = self.slot(s)
        return (dequantize(p.gate, self.fmt, dtype), dequantize(p.up, self.fmt, dtype),
                dequantize(p.down, self.fmt, dtype))
