"""Routed expert weights kept as raw GGUF blocks, per layer and projection.

A ``GgufTensor`` is one stacked projection, e.g. gate ``[E, I, H]``, stored as uint8 ``[E, I, bytes per
row]`` where each row of ``H`` values is a run of GGUF blocks of its type. The three projections of a
layer may use different types (Q4_K_M files often store down as Q6_K). ``GgufExperts`` maps MoE layer
indices to their ``GgufLayerExperts``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch

from hybrimoe_kt.kernels import gguf_quant

# Types the CPU tier accepts for routed experts (names as in gguf.GGMLQuantizationType).
EXPERT_GGUF_TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q8_0", "BF16")


def ggml_type_id(type_name: str) -> int:
    """The ggml enum value of a type name ("Q4_K" -> 12); ValueError for unknown names."""
    from gguf import GGMLQuantizationType

    try:
        return int(GGMLQuantizationType[type_name.upper()])
    except KeyError:
        raise ValueError(f"unknown GGUF type {type_name!r}") from None


def block_layout(type_name: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a GGUF type."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type_id(type_name))]


@dataclass(frozen=True)
class GgufTensor:
    """One stacked projection: ``shape`` = logical [E, O, In]; ``data`` = uint8 [E, O, row bytes]."""

    type_name: str                 # e.g. "Q4_K"
    shape: tuple[int, int, int]    # [E, O, In] in values
    data: np.ndarray               # uint8 [E, O, In / block * block bytes]

    def __post_init__(self) -> None:
        name = self.type_name.upper()
        ggml_type_id(name)  # unknown names raise here
        if name not in EXPERT_GGUF_TYPES:
            raise ValueError(f"GGUF type {self.type_name!r} is not supported for routed experts; "
                             f"use one of {', '.join(EXPERT_GGUF_TYPES)}")
        object.__setattr__(self, "type_name", name)
        block, nbytes = block_layout(name)
        e, o, n_in = self.shape
        if n_in % block:
            raise ValueError(f"{name} rows need a multiple of {block} values, got {n_in}")
        want = (e, o, n_in // block * nbytes)
        if self.data.dtype != np.uint8 or tuple(self.data.shape) != want:
            raise ValueError(f"{name} data for shape {self.shape} must be uint8 {want}, got "
                             f"{self.data.dtype} {tuple(self.data.shape)}")

    @property
    def type_id(self) -> int:
        return ggml_type_id(self.type_name)

    @classmethod
    def quantize(cls, w: torch.Tensor | np.ndarray, type_name: str) -> GgufTensor:
        """Quantise dense weights [E, O, In] along In."""
        arr = w.float().numpy() if isinstance(w, torch.Tensor) else np.asarray(w, np.float32)
        if arr.ndim != 3:
            raise ValueError(f"expert weights must be [E, O, In], got shape {arr.shape}")
        return cls(type_name.upper(), tuple(arr.shape), gguf_quant.quantize(arr, type_name))

    def dequantize(self, expert: int | None = None) -> torch.Tensor:
        """float32 [E, O, In], or [O, In] for one expert."""
        raw = self.data if expert is None else self.data[expert]
        w = gguf_quant.dequantize(np.ascontiguousarray(raw), self.type_name)
        return torch.from_numpy(w)


@dataclass(frozen=True)
class GgufLayerExperts:
    """One MoE layer: gate and up [E, I, H], down [E, H, I]."""

    gate: GgufTensor
    up: GgufTensor
    down: GgufTensor

    def __post_init__(self) -> None:
        e, i, h = self.gate.shape
        if self.up.shape != self.gate.shape or self.down.shape != (e, h, i):
            raise ValueError(f"gate/up must be [E, I, H] and down [E, H, I]; got {self.gate.shape}, "
                             f"{self.up.shape}, {self.down.shape}")

    @property
    def n_experts(self) -> int:
        return self.gate.shape[0]

    @property
    def intermediate(self) -> int:
        return self.gate.shape[1]

    @property
    def hidden(self) -> int:
        return self.gate.shape[2]

    @property
    def types(self) -> tuple[str, str, str]:
        return self.gate.type_name, self.up.type_name, self.down.type_name

    @classmethod
    def quantize(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                 types: str | tuple[str, str, str]) -> GgufLayerExperts:
        """Quantise dense weights; ``types`` is one name or (gate, up, down) names."""
        tg, tu, td = (types, types, types) if isinstance(types, str) else types
        return cls(GgufTensor.quantize(gate, tg), GgufTensor.quantize(up, tu),
                   GgufTensor.quantize(down, td))

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """float32 gate, up [E, I, H] and down [E, H, I]."""
        return self.gate.dequantize(), self.up.dequantize(), self.down.dequantize()


@dataclass
class GgufExperts:
    """Routed experts of a model: MoE layer index -> its quantised projections."""

    layers: dict[int, GgufLayerExperts] = field(default_factory=dict)

    def layer(self, idx: int) -> GgufLayerExperts:
        if idx not in self.layers:
            raise ValueError(f"no routed experts for layer {idx}; have {sorted(self.layers)}")
        return self.layers[idx]

    @classmethod
    def from_tensors(cls, tensors: Mapping[tuple[int, str], tuple[str, np.ndarray, tuple[int, ...]]]
                     ) -> GgufExperts:
        """From ``hybrimoe_kt.kt.gguf_io.read_gguf_experts``: (layer, proj) -> (type, raw, shape)."""
        by_layer: dict[int, dict[str, GgufTensor]] = {}
        for (layer, proj), (type_name, raw, shape) in tensors.items():
            e, o, n_in = (int(s) for s in shape)
            data = np.ascontiguousarray(raw).view(np.uint8).reshape(e, o, -1)
            by_layer.setdefault(layer, {})[proj] = GgufTensor(type_name, (e, o, n_in), data)
        layers = {}
        for layer, projs in sorted(by_layer.items()):
            missing = {"gate", "up", "down"} - set(projs)
            if missing:
                raise ValueError(f"layer {layer} lacks expert projections {sorted(missing)}")
            layers[layer] = GgufLayerExperts(projs["gate"], projs["up"], projs["down"])
        return cls(layers)
