"""GPU expert slots that hold an expert's raw GGUF blocks, as the host store holds them.

A slot copy moves the expert's bytes unchanged (no dequantization on the host: ``write_blocks``), and
the GPU expert kernels dequantize a slot right before its matrix products (``dequant_slot``, torch,
any device; ``gguf_torch``). One pool serves every MoE layer, and a GGUF file may give a projection
different types in different layers (Q4_K_M files keep some ``down`` projections in Q6_K), so each
projection's slot rows are as wide as its widest type and each slot remembers the types it holds.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from hybrimoe_kt.kernels.gguf_torch import BLOCK_BYTES, dequantize

PROJECTIONS = ("gate", "up", "down")
TYPE_CODES = {"Q8_0": 3, "Q4_K": 4, "Q6_K": 5, "Q5_K": 7, "BF16": 8}  # the Triton kernel's formats (kernels/_triton_expert_kernels.py)


def row_bytes(type_name: str, n_values: int) -> int:
    """Bytes of one row of ``n_values`` values in GGUF ``type_name``."""
    per, nbytes = BLOCK_BYTES[type_name]
    if n_values % per:
        raise ValueError(f"{type_name} rows need a multiple of {per} values, got {n_values}")
    return n_values // per * nbytes


class GgufSlotWeights:
    fmt = "gguf"

    def __init__(self, n_slots: int, hidden: int, inter: int, types: Sequence[Iterable[str]],
                 device: torch.device | str = "cpu") -> None:
        """``types``: per projection (gate, up, down), every GGUF type it may hold."""
        if n_slots < 1 or hidden < 1 or inter < 1:
            raise ValueError(f"n_slots, hidden and inter must be >= 1, got {n_slots}, {hidden}, {inter}")
        self.n_slots, self.hidden, self.inter = n_slots, hidden, inter
        types = [list(names) for names in types]
        shapes = ((inter, hidden), (inter, hidden), (hidden, inter))  # (rows, values per row)
        self._rows: list[tuple[int, int]] = []
        self.data: list[torch.Tensor] = []  # per projection: uint8 [S, rows, widest row bytes]
        for names, (rows, n_in) in zip(types, shapes):
            names = sorted({t.upper() for t in names})
            unknown = [t for t in names if t not in BLOCK_BYTES]
            if not names or unknown:
                raise ValueError(f"GGUF slots hold {', '.join(BLOCK_BYTES)}; got {names or 'no type'}")
            width = max(row_bytes(t, n_in) for t in names)
            self._rows.append((rows, n_in))
            self.data.append(torch.zeros(n_slots, rows, width, dtype=torch.uint8, device=device))
        self.types: list[tuple[str, str, str] | None] = [None] * n_slots  # what each slot holds
        allowed = [sorted({t.upper() for t in names}) for names in types]
        self._allowed = allowed
        # per projection and slot, the type code the Triton kernel dispatches on (0: empty or none)
        self.codes = torch.zeros(3, n_slots, dtype=torch.int32, device=device)
        # the one type every projection holds, if there is one (the Triton kernel reads Q8_0 slots)
        self.uniform_type = allowed[0][0] if all(a == allowed[0] and len(a) == 1 for a in allowed) else None

    def all_types_in(self, names: Sequence[str]) -> bool:
        """Whether every type these slots may hold is one of ``names``."""
        return all(t in names for a in self._allowed for t in a)

    @property
    def device(self) -> torch.device:
        return self.data[0].device

    def slot_nbytes(self) -> int:
        """Bytes one slot occupies on the device (each projection at its widest type)."""
        return sum(d[0].numel() for d in self.data)

    def write_blocks(self, s: int, types: Sequence[str], blocks: Sequence[torch.Tensor],
                     non_blocking: bool = False) -> None:
        """Copy one expert's raw blocks (uint8 [rows, row bytes] per projection) into slot ``s``."""
        if not 0 <= s < self.n_slots:
            raise IndexError(f"slot {s} out of range [0, {self.n_slots})")
        names = tuple(t.upper() for t in types)
        for name, src, dst, (rows, n_in), proj in zip(names, blocks, self.data, self._rows, PROJECTIONS):
            want = (rows, row_bytes(name, n_in)) if name in BLOCK_BYTES else None
            if want is None or src.dtype != torch.uint8 or tuple(src.shape) != want or want[1] > dst.shape[2]:
                raise ValueError(f"{proj} blocks must be uint8 {want} of a type these slots hold, got "
                                 f"{name} {src.dtype} {tuple(src.shape)}")
            dst[s, :, : want[1]].copy_(src, non_blocking=non_blocking)
        for p, name in enumerate(names):  # queued after the copy on the same stream
            self.codes[p, s].fill_(TYPE_CODES.get(name, 0))
        self.types[s] = names  # type: ignore[assignment]

    def copy_slot(self, dst: int, src: int, non_blocking: bool = False) -> None:
        """Copy slot ``src`` (blocks and type codes) into slot ``dst`` on the device."""
        for s in (dst, src):
            if not 0 <= s < self.n_slots:
                raise IndexError(f"slot {s} out of range [0, {self.n_slots})")
        for d in self.data:
            d[dst].copy_(d[src], non_blocking=non_blocking)
        self.codes[:, dst].copy_(self.codes[:, src], non_blocking=non_blocking)
        self.types[dst] = self.types[src]

    def dequant_slot(self, s: int, dtype: torch.dtype = torch.float32
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Slot ``s`` as plain weights: ``gate [I, H]``, ``up [I, H]``, ``down [H, I]`` in ``dtype``."""
        if not 0 <= s < self.n_slots:
            raise IndexError(f"slot {s} out of range [0, {self.n_slots})")
        names = self.types[s]
        if names is None:
            raise RuntimeError(f"slot {s} holds no expert")
        return tuple(dequantize(d[s, :, : row_bytes(t, n_in)], t).to(dtype)  # type: ignore[return-value]
                     for t, d, (_, n_in) in zip(names, self.data, self._rows))
