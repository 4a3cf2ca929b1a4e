"""One MoE layer's routed experts from classic kTransformers' GGUF loader, kept quantized.

kTransformers' ``GGUFLoader`` indexes every tensor of the model's GGUF files in ``tensor_info`` (by GGUF
name: ``ggml_type``, the integer ggml type, and ``shape``, GGUF's dimension order, innermost first) and
serves a tensor's bytes as stored with ``get_mmap_tensor(name)``: a flat slice of the file's read-only
memory map. Both exist from v0.2 to v0.4 (v0.3+ also translate module names; GGUF names pass through
unchanged), so the reader uses only those two, with GGUF names:

- fused experts (DeepSeek, Qwen2/3-MoE, newer Mixtral files): ``blk.<i>.ffn_{gate,up,down}_exps.weight``,
  shape (H, I, E) / (I, H, E); the layer's blocks stay views of the file mapping (no copy);
- per-expert tensors (older Mixtral files): ``blk.<i>.ffn_{gate,up,down}.<e>.weight``; the experts are
  stacked into one array per projection (one host copy; the mapping's pages are then not needed).

The result is a ``GgufLayerExperts``: the blocks exactly as the file holds them, for the CPU kernels
and the GPU slots (no dequantization).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from hybrimoe_kt.kernels.gguf_experts import GgufLayerExperts, GgufTensor, block_layout

PROJS = ("gate", "up", "down")
FUSED = "blk.{layer}.ffn_{proj}_exps.weight"
PER_EXPERT = "blk.{layer}.ffn_{proj}.{expert}.weight"


def _type_name(entry: Mapping[str, Any], name: str) -> str:
    from gguf import GGMLQuantizationType

    t = entry.get("ggml_type")
    try:
        return GGMLQuantizationType(int(t)).name  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: unknown ggml_type {t!r} in the loader's tensor_info") from None


def _raw(loader: Any, info: Mapping[str, Any], name: str, dims: int) -> tuple[str, tuple[int, ...], np.ndarray]:
    """(type name, numpy-order shape, flat uint8 bytes) of tensor ``name``, checked against its size."""
    entry = info[name]
    type_name = _type_name(entry, name)
    shape = tuple(int(d) for d in reversed(list(entry["shape"])))
    if len(shape) != dims:
        raise ValueError(f"{name}: expected a {dims}-D tensor, tensor_info says shape {list(entry['shape'])}")
    block, nbytes = block_layout(type_name)
    if shape[-1] % block:
        raise ValueError(f"{name}: {type_name} rows need a multiple of {block} values, got {shape[-1]}")
    want = int(np.prod(shape[:-1])) * (shape[-1] // block) * nbytes
    raw = np.asarray(loader.get_mmap_tensor(name)).reshape(-1).view(np.uint8)
    if raw.size != want:
        raise ValueError(f"{name}: the loader returned {raw.size} bytes, {type_name} {shape} needs {want}")
    return type_name, shape, raw


def _tensor(type_name: str, shape: tuple[int, int, int], data: np.ndarray, name: str) -> GgufTensor:
    try:
        return GgufTensor(type_name, shape, data.reshape(shape[0], shape[1], -1))
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _fused(loader: Any, info: Mapping[str, Any], layer: int, proj: str) -> GgufTensor:
    name = FUSED.format(layer=layer, proj=proj)
    type_name, shape, raw = _raw(loader, info, name, 3)
    return _tensor(type_name, shape, raw, name)  # type: ignore[arg-type]


def _stacked(loader: Any, info: Mapping[str, Any], layer: int, proj: str, n_experts: int) -> GgufTensor:
    parts, kinds = [], set()
    for e in range(n_experts):
        name = PER_EXPERT.format(layer=layer, proj=proj, expert=e)
        if name not in info:
            raise ValueError(f"{name} is missing: the GGUF files hold per-expert tensors for layer {layer} "
                             f"but not all {n_experts} experts")
        type_name, shape, raw = _raw(loader, info, name, 2)
        kinds.add((type_name, shape))
        parts.append(raw)
    if len(kinds) != 1:
        raise ValueError(f"blk.{layer}.ffn_{proj}.<e>.weight: the experts differ in type or shape: {sorted(kinds)}")
    type_name, shape = kinds.pop()
    data = np.stack(parts)  # [E, bytes of one expert]: one host copy
    return _tensor(type_name, (n_experts, *shape), data, f"blk.{layer}.ffn_{proj}.<e>.weight")  # type: ignore[arg-type]


def read_layer_experts(loader: Any, layer: int, n_experts: int, key: str) -> GgufLayerExperts:
    """Decoder layer ``layer``'s routed experts from kTransformers' GGUF ``loader``; ``key`` (the
    operator's module key) and ``n_experts`` (the model's) are checked against what the files hold."""
    info = getattr(loader, "tensor_info", None)
    if not isinstance(info, Mapping) or not callable(getattr(loader, "get_mmap_tensor", None)):
        raise ValueError(f"{key}: the model loader ({type(loader).__name__}) has no GGUF tensor_info and "
                         f"get_mmap_tensor; the HybriMoE operator reads the routed experts from GGUF "
                         f"files: pass --gguf_path a folder of the model's .gguf files")
    if FUSED.format(layer=layer, proj="gate") in info:
        projs = [_fused(loader, info, layer, p) for p in PROJS]
    elif PER_EXPERT.format(layer=layer, proj="gate", expert=0) in info:
        projs = [_stacked(loader, info, layer, p, n_experts) for p in PROJS]
    else:
        raise ValueError(f"{key}: the GGUF files have no routed experts for decoder layer {layer} (neither "
                         f"{FUSED.format(layer=layer, proj='gate')} nor "
                         f"{PER_EXPERT.format(layer=layer, proj='gate', expert=0)})")
    try:
        lx = GgufLayerExperts(*projs)
    except ValueError as e:
        raise ValueError(f"{key}: layer {layer}'s expert tensors do not fit together: {e}") from None
    if lx.n_experts != n_experts:
        raise ValueError(f"{key}: the GGUF files hold {lx.n_experts} experts for layer {layer}, the model "
                         f"{n_experts}")
    return lx
