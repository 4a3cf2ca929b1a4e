"""The in-memory routing trace (:class:`Trace`), its forward passes, and reading/writing NAME.npz + NAME.json."""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from hybrimoe_kt.core.types import LayerRouting
from hybrimoe_kt.traces.validate import TraceError, check_arrays, check_metadata

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
_ARRAY_NAMES = ("experts", "weights", "seq_id", "pos", "is_prefill", "valid", "layer_ids", "step", "row")


@dataclass(frozen=True, slots=True)
class Forward:
    """One forward pass of the traced model: which trace rows (tokens) it processed, in order."""

    rows: np.ndarray = field(repr=False)  # int64 row indices into the trace
    is_prefill: bool
    seq: int  # request id, -1 when the rows belong to several or unknown requests
    step: int  # forward index (the trace's ``step`` value when it has one)

    @property
    def n_tokens(self) -> int:
        return int(self.rows.size)


@dataclass(frozen=True, eq=False)
class Trace:
    """A validated routing trace (see TRACE_FORMAT.md). Build it with arrays of any castable dtype;
    ``__post_init__`` validates and stores them in the format's dtypes."""

    experts: np.ndarray  # int16 [T, L, K], -1 = unknown
    seq_id: np.ndarray  # int32 [T]
    pos: np.ndarray  # int32 [T]
    is_prefill: np.ndarray  # bool [T]
    metadata: dict[str, Any]
    weights: Optional[np.ndarray] = None  # float16 [T, L, K]
    valid: Optional[np.ndarray] = None  # bool [T, L]; None means all True
    layer_ids: Optional[np.ndarray] = None  # int16 [L]; None means 0..L-1
    step: Optional[np.ndarray] = None  # int32 [T]
    row: Optional[np.ndarray] = None  # int32 [T]
    source: Optional[str] = None  # file the trace was read from, for messages

    def __post_init__(self) -> None:
        check_metadata(self.metadata, self.source)
        arrays = {n: getattr(self, n) for n in _ARRAY_NAMES}
        for name, arr in check_arrays(arrays, self.metadata, self.source).items():
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "metadata", dict(self.metadata))

    # ---- shape ---------------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    @property
    def n_experts(self) -> int:
        return int(self.metadata["n_experts"])

    @property
    def model(self) -> str:
        return str(self.metadata["model"])

    @cached_property
    def usable(self) -> np.ndarray:
        """bool [T, L, K]: entries that name a real expert in a valid row."""
        return (self.experts >= 0) & self.valid[:, :, None]

    @property
    def n_skipped(self) -> int:
        """Entries (token, layer, slot) readers skip: -1 ids or rows with ``valid == False``."""
        return int(self.usable.size - self.usable.sum())

    @property
    def n_invalid_rows(self) -> int:
        return int((~self.valid).sum())

    # ---- forwards and routing ----------------------------------------------------------------
    @cached_property
    def _forwards(self) -> tuple[Forward, ...]:
        out: list[Forward] = []
        if self.step is not None:
            steps, first = np.unique(self.step, return_index=True)
            for s in steps[np.argsort(first, kind="stable")]:
                rows = np.flatnonzero(self.step == s)
                seqs = np.unique(self.seq_id[rows])
                out.append(Forward(rows, bool(self.is_prefill[rows].any()),
                                   int(seqs[0]) if seqs.size == 1 else -1, int(s)))
            return tuple(out)
        start = 0
        t = self.n_tokens
        while start < t:
            end = start + 1
            if self.is_prefill[start]:
                while (end < t and self.is_prefill[end] and self.seq_id[end] == self.seq_id[start]
                       and not (self.pos[end] >= 0 and self.pos[end - 1] >= 0
                                and self.pos[end] != self.pos[end - 1] + 1)):
                    end += 1
            out.append(Forward(np.arange(start, end), bool(self.is_prefill[start]),
                               int(self.seq_id[start]), len(out)))
            start = end
        return tuple(out)

    def forwards(self) -> list[Forward]:
        """Forward passes in execution order: one per ``step`` value when the trace has steps;
        otherwise each run of consecutive prefill tokens of one request is one forward and every
        decode token is its own forward."""
        return list(self._forwards)

    def layer_routing(self, forward: Forward, layer: int, top_k: Optional[int] = None) -> LayerRouting:
        """Routing of recorded MoE layer ``layer`` (0..L-1) in ``forward``; invalid rows get ids -1."""
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} out of range 0..{self.n_layers - 1}")
        rows = forward.rows
        ids = self.experts[rows, layer].astype(np.int32)
        ids[~self.valid[rows, layer]] = -1
        scores = None
        if self.weights is not None:
            scores = np.where(ids >= 0, self.weights[rows, layer].astype(np.float32), 0.0).astype(np.float32)
        return LayerRouting.from_topk(layer, ids, scores, forward.is_prefill, top_k)

    # ---- selection and counts ----------------------------------------------------------------
    def requests(self) -> list[int]:
        """Distinct known request ids (-1 excluded) in order of first appearance."""
        ids, first = np.unique(self.seq_id, return_index=True)
        return [int(i) for i in ids[np.argsort(first, kind="stable")] if i >= 0]

    def select(self, which: Union[np.ndarray, Sequence[int]]) -> "Trace":
        """A new trace with only some tokens: ``which`` is a bool mask over rows or a list of seq ids."""
        arr = np.asarray(which)
        if arr.dtype == bool:
            if arr.shape != (self.n_tokens,):
                raise ValueError(f"row mask has shape {arr.shape}, expected ({self.n_tokens},)")
            mask = arr
        elif arr.size == 0 or arr.dtype.kind in "iu":
            mask = np.isin(self.seq_id, arr)
        else:
            raise ValueError(f"select() takes a bool row mask or seq ids, got dtype {arr.dtype}")
        if not mask.any():
            raise ValueError(f"selection {which!r} matches no token of the trace "
                             f"(requests: {self.requests()})")
        kw = {n: (None if getattr(self, n) is None or n == "layer_ids" else getattr(self, n)[mask])
              for n in _ARRAY_NAMES}
        kw["layer_ids"] = self.layer_ids
        return Trace(metadata=self.metadata, source=self.source, **kw)

    def expert_counts(self, rows: Optional[np.ndarray] = None) -> np.ndarray:
        """int64 [L, E]: how often each expert was activated (skipping -1 ids and invalid rows)."""
        ex = self.experts if rows is None else self.experts[rows]
        ok = self.usable if rows is None else self.usable[rows]
        layer = np.broadcast_to(np.arange(self.n_layers)[None, :, None], ex.shape)
        flat = layer[ok].astype(np.int64) * self.n_experts + ex[ok]
        return np.bincount(flat, minlength=self.n_layers * self.n_experts).reshape(
            self.n_layers, self.n_experts)


def _paths(path: PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".npz", ".json"):
        p = p.with_suffix("")
    return p.parent / (p.name + ".npz"), p.parent / (p.name + ".json")


def load_trace(path: PathLike) -> Trace:
    """Read NAME.npz + NAME.json (``path`` may name either file or the stem) and validate it."""
    npz_path, json_path = _paths(path)
    for p in (npz_path, json_path):
        if not p.is_file():
            raise TraceError(f"trace {p}: file not found (a trace is NAME.npz plus NAME.json)")
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TraceError(f"trace {json_path}: not valid JSON: {e}") from None
    check_metadata(meta, str(json_path))
    try:
        with np.load(npz_path, allow_pickle=False) as data:
            arrays = {n: data[n] for n in _ARRAY_NAMES if n in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise TraceError(f"trace {npz_path}: cannot read the .npz file (corrupt or not numpy "
                         f"savez output): {e}") from None
    trace = Trace(metadata=meta, source=str(npz_path), **{n: arrays.get(n) for n in _ARRAY_NAMES})
    log.info("loaded trace %s: T=%d L=%d K=%d E=%d; skipped %d entries (-1 ids or %d invalid rows)",
             npz_path, trace.n_tokens, trace.n_layers, trace.top_k, trace.n_experts,
             trace.n_skipped, trace.n_invalid_rows)
    return trace


def save_trace(trace: Trace, path_stem: PathLike) -> Path:
    """Write ``path_stem``.npz and ``path_stem``.json; returns the .npz path."""
    npz_path, json_path = _paths(path_stem)
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {n: getattr(trace, n) for n in _ARRAY_NAMES if getattr(trace, n) is not None}
    np.savez_compressed(npz_path, **arrays)
    meta = dict(trace.metadata)
    meta.update(n_layers=trace.n_layers, n_experts=trace.n_experts, top_k=trace.top_k,
                file=npz_path.name,
                arrays={n: [str(a.dtype), list(a.shape)] for n, a in arrays.items()})
    json_path.write_text(json.dumps(meta, sort_keys=True, indent=2) + "\n")
    log.info("wrote trace %s (+ .json): T=%d L=%d K=%d", npz_path, trace.n_tokens, trace.n_layers,
             trace.top_k)
    return npz_path
