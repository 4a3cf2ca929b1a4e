"""Validation of routing-trace arrays and metadata against the trace format (TRACE_FORMAT.md).

Every check raises :class:`TraceError` with one message that names the problem and, when the caller
passes it, the file. Arrays are cast to the format's dtypes only when the cast loses nothing.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

REQUIRED_META: dict[str, type | tuple[type, ...]] = {
    "model": str,
    "n_layers": int,
    "n_experts": int,
    "top_k": int,
    "n_shared_experts": int,
    "weights_meaning": str,
    "source": (str, dict, list),
    "licence": str,
}
REQUIRED_ARRAYS = ("experts", "seq_id", "pos", "is_prefill")
OPTIONAL_ARRAYS = ("weights", "valid", "layer_ids", "step", "row")


class TraceError(ValueError):
    """A routing trace file is missing, unreadable or breaks the trace format."""


def _where(source: Optional[str]) -> str:
    return f"trace {source}: " if source else "trace: "


def check_metadata(meta: Mapping[str, Any], source: Optional[str] = None) -> None:
    """Required keys must be present with the right type; other keys are allowed."""
    if not isinstance(meta, Mapping):
        raise TraceError(f"{_where(source)}metadata must be a JSON object, got {type(meta).__name__}")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise TraceError(f"{_where(source)}metadata is missing required key(s) {', '.join(missing)}; "
                         f"add them to the .json file (required: {', '.join(REQUIRED_META)})")
    for key, typ in REQUIRED_META.items():
        value = meta[key]
        if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise TraceError(f"{_where(source)}metadata key {key!r} must be an integer, got {value!r}")
        if not isinstance(value, typ):
            raise TraceError(f"{_where(source)}metadata key {key!r} has type {type(value).__name__}, "
                             f"expected {typ.__name__ if isinstance(typ, type) else 'string or object'}")
    for key in ("n_layers", "n_experts", "top_k"):
        if meta[key] < 1:
            raise TraceError(f"{_where(source)}metadata {key}={meta[key]} must be >= 1")
    if meta["n_shared_experts"] < 0:
        raise TraceError(f"{_where(source)}metadata n_shared_experts={meta['n_shared_experts']} must be >= 0")


def cast_array(name: str, value: Any, dtype: str, source: Optional[str] = None) -> np.ndarray:
    """Cast ``value`` to ``dtype`` if that is exact (integers in range, booleans 0/1, real floats)."""
    try:
        arr = np.asarray(value)
    except Exception as e:  # ragged or otherwise unreadable objects
        raise TraceError(f"{_where(source)}array {name!r} cannot be read as an array: {e}") from None
    target = np.dtype(dtype)
    kind = arr.dtype.kind
    bad = TraceError(f"{_where(source)}array {name!r} has dtype {arr.dtype}, which cannot be cast to "
                     f"{target}; write it as {target}")
    if arr.dtype == target:
        return arr
    if target.kind == "b":
        if kind == "b":
            return arr.astype(bool)
        if kind in "iu" and (arr.size == 0 or np.isin(arr, (0, 1)).all()):
            return arr.astype(bool)
        raise bad
    if target.kind == "i":
        if kind in "iub":
            info = np.iinfo(target)
            if arr.size and (arr.min() < info.min or arr.max() > info.max):
                raise TraceError(f"{_where(source)}array {name!r} has values outside the {target} range "
                                 f"[{info.min}, {info.max}] (min {arr.min()}, max {arr.max()})")
            return arr.astype(target)
        if kind == "f":
            if arr.size and not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
                raise TraceError(f"{_where(source)}array {name!r} has non-integer float values; "
                                 f"write it as {target}")
            return cast_array(name, arr.astype(np.int64), dtype, source)
        raise bad
    if target.kind == "f":
        if kind in "fiu":
            return arr.astype(target)
        raise bad
    raise bad


def check_arrays(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any],
                 source: Optional[str] = None) -> dict[str, Optional[np.ndarray]]:
    """Validate the arrays of one trace and return them cast to the format's dtypes.

    Returns a dict with every name of :data:`REQUIRED_ARRAYS` and :data:`OPTIONAL_ARRAYS` (None for an
    absent optional array; ``valid`` defaults to all True and ``layer_ids`` to 0..L-1).
    """
    w = _where(source)
    missing = [k for k in REQUIRED_ARRAYS if arrays.get(k) is None]
    if missing:
        raise TraceError(f"{w}missing required array(s) {', '.join(missing)} "
                         f"(required: {', '.join(REQUIRED_ARRAYS)})")
    experts = cast_array("experts", arrays["experts"], "int16", source)
    if experts.ndim != 3:
        raise TraceError(f"{w}array 'experts' must be 3-D [T, L, K], got shape {experts.shape}")
    t, n_layers, k = experts.shape
    if t == 0:
        raise TraceError(f"{w}has no tokens (T = 0); a trace needs at least one token")
    if n_layers != meta["n_layers"]:
        raise TraceError(f"{w}metadata n_layers={meta['n_layers']} but 'experts' has L={n_layers} "
                         f"(shape {experts.shape}); fix n_layers in the .json")
    if k != meta["top_k"]:
        raise TraceError(f"{w}metadata top_k={meta['top_k']} but 'experts' has K={k} "
                         f"(shape {experts.shape}); fix top_k in the .json")
    n_experts = meta["n_experts"]
    if experts.min() < -1 or experts.max() >= n_experts:
        bad = experts[(experts < -1) | (experts >= n_experts)]
        raise TraceError(f"{w}array 'experts' has id {int(bad[0])} outside -1..{n_experts - 1} "
                         f"({bad.size} bad entries; n_experts={n_experts} in the .json)")
    run = np.sort(experts.reshape(-1, k), axis=1)
    dup = (run[:, 1:] == run[:, :-1]) & (run[:, 1:] >= 0)
    if dup.any():
        row = int(np.flatnonzero(dup.any(axis=1))[0])
        raise TraceError(f"{w}token {row // n_layers} layer {row % n_layers} lists an expert twice: "
                         f"{experts.reshape(-1, k)[row].tolist()}")
    out: dict[str, Optional[np.ndarray]] = {"experts": experts}
    shapes = {"seq_id": ((t,), "int32"), "pos": ((t,), "int32"), "is_prefill": ((t,), "bool"),
              "weights": ((t, n_layers, k), "float16"), "valid": ((t, n_layers), "bool"),
              "layer_ids": ((n_layers,), "int16"), "step": ((t,), "int32"), "row": ((t,), "int32")}
    for name, (shape, dtype) in shapes.items():
        if name not in arrays or arrays[name] is None:
            out[name] = None
            continue
        arr = cast_array(name, arrays[name], dtype, source)
        if arr.shape != shape:
            raise TraceError(f"{w}array {name!r} has shape {arr.shape}, expected {shape} "
                             f"(T={t}, L={n_layers}, K={k} from 'experts')")
        out[name] = arr
    if out["weights"] is not None and not np.isfinite(out["weights"][experts >= 0]).all():
        raise TraceError(f"{w}array 'weights' has NaN or infinite values for valid experts")
    if out["valid"] is None:
        out["valid"] = np.ones((t, n_layers), dtype=bool)
    if out["layer_ids"] is None:
        out["layer_ids"] = np.arange(n_layers, dtype=np.int16)
    return out
