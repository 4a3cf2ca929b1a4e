"""Reading, validating and writing routing traces."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from hybrimoe_kt.traces import Trace, TraceError, load_trace, save_trace
from hybrimoe_kt.traces.synthetic import synthetic_trace


def _good(tmp_path: Path) -> tuple[dict, dict, Path]:
    t, n_layers, k = 6, 2, 2
    rng = np.random.default_rng(0)
    experts = np.stack([[rng.permutation(4)[:k] for _ in range(n_layers)] for _ in range(t)]).astype(np.int16)
    arrays = {"experts": experts, "weights": np.full((t, n_layers, k), 0.5, np.float16),
              "seq_id": np.zeros(t, np.int32), "pos": np.arange(t, dtype=np.int32),
              "is_prefill": np.array([1, 1, 1, 0, 0, 0], bool)}
    meta = {"model": "tiny", "n_layers": n_layers, "n_experts": 4, "top_k": k, "n_shared_experts": 0,
            "weights_meaning": "uniform", "source": "test", "licence": "test"}
    return arrays, meta, tmp_path / "t"


def _write(stem: Path, arrays: dict, meta: dict | None) -> None:
    np.savez_compressed(stem.with_suffix(".npz"), **arrays)
    if meta is not None:
        stem.with_suffix(".json").write_text(json.dumps(meta))


def _broken(tmp_path: Path, match: str, arrays=None, meta=None, drop_meta=False, **changes) -> None:
    a, m, stem = _good(tmp_path)
    a.update(arrays or {})
    m.update(meta or {})
    for key in changes.get("remove", ()):
        m.pop(key)
    _write(stem, a, None if drop_meta else m)
    with pytest.raises(TraceError, match=match) as err:
        load_trace(stem)
    assert str(stem) in str(err.value)


def test_good_file_loads_by_stem_npz_or_json(tmp_path: Path) -> None:
    a, m, stem = _good(tmp_path)
    _write(stem, a, m)
    for p in (stem, stem.with_suffix(".npz"), str(stem.with_suffix(".json"))):
        tr = load_trace(p)
        assert (tr.n_tokens, tr.n_layers, tr.top_k, tr.n_experts) == (6, 2, 2, 4)
        assert tr.valid.all() and tr.n_skipped == 0


def test_missing_json(tmp_path: Path) -> None:
    _broken(tmp_path, "file not found", drop_meta=True)


def test_missing_npz(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"nothing\.npz: file not found"):
        load_trace(tmp_path / "nothing")


def test_missing_json_key(tmp_path: Path) -> None:
    _broken(tmp_path, "missing required key.*n_experts", remove=("n_experts",))


def test_missing_array(tmp_path: Path) -> None:
    a, m, stem = _good(tmp_path)
    del a["pos"]
    _write(stem, a, m)
    with pytest.raises(TraceError, match="missing required array.*pos"):
        load_trace(stem)


def test_shape_mismatch(tmp_path: Path) -> None:
    _broken(tmp_path, "'seq_id' has shape", arrays={"seq_id": np.zeros(5, np.int32)})


def test_weights_shape_mismatch(tmp_path: Path) -> None:
    _broken(tmp_path, "'weights' has shape", arrays={"weights": np.zeros((6, 2, 3), np.float16)})


def test_id_too_large(tmp_path: Path) -> None:
    a, _, _ = _good(tmp_path)
    e = a["experts"].copy()
    e[2, 1, 0] = 4
    _broken(tmp_path, "id 4 outside -1..3", arrays={"experts": e})


def test_id_below_minus_one(tmp_path: Path) -> None:
    a, _, _ = _good(tmp_path)
    e = a["experts"].copy()
    e[0, 0, 1] = -2
    _broken(tmp_path, "id -2 outside", arrays={"experts": e})


def test_zero_tokens(tmp_path: Path) -> None:
    a, _, _ = _good(tmp_path)
    _broken(tmp_path, r"T = 0", arrays={k: v[:0] for k, v in a.items()})


def test_uncastable_dtype(tmp_path: Path) -> None:
    _broken(tmp_path, "dtype <U1, which cannot be cast to int32",
            arrays={"seq_id": np.array(list("abcdef"))})


def test_non_integer_float_ids(tmp_path: Path) -> None:
    a, _, _ = _good(tmp_path)
    _broken(tmp_path, "non-integer float", arrays={"experts": a["experts"] + 0.5})


def test_n_layers_mismatch(tmp_path: Path) -> None:
    _broken(tmp_path, "n_layers=3 but 'experts' has L=2", meta={"n_layers": 3})


def test_top_k_mismatch(tmp_path: Path) -> None:
    _broken(tmp_path, "top_k=1 but 'experts' has K=2", meta={"top_k": 1})


def test_corrupt_npz(tmp_path: Path) -> None:
    _, m, stem = _good(tmp_path)
    stem.with_suffix(".npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
    stem.with_suffix(".json").write_text(json.dumps(m))
    with pytest.raises(TraceError, match="cannot read the .npz") as err:
        load_trace(stem)
    assert str(stem) in str(err.value)


def test_corrupt_json(tmp_path: Path) -> None:
    a, _, stem = _good(tmp_path)
    _write(stem, a, None)
    stem.with_suffix(".json").write_text("{not json")
    with pytest.raises(TraceError, match="not valid JSON"):
        load_trace(stem)


def test_extra_arrays_and_keys_are_ignored(tmp_path: Path) -> None:
    a, m, stem = _good(tmp_path)
    a["something_else"] = np.zeros(3)
    m["caveats"] = ["x"]
    m["unknown_key"] = 1
    _write(stem, a, m)
    assert load_trace(stem).n_tokens == 6


def test_castable_dtypes_are_cast(tmp_path: Path) -> None:
    a, m, stem = _good(tmp_path)
    a["experts"] = a["experts"].astype(np.int64)
    a["is_prefill"] = a["is_prefill"].astype(np.int8)
    _write(stem, a, m)
    tr = load_trace(stem)
    assert tr.experts.dtype == np.int16 and tr.is_prefill.dtype == bool


def test_round_trip(tmp_path: Path) -> None:
    tr = synthetic_trace("mixtral-8x7b", n_requests=2, prompt_len=5, decode_len=4, seed=3, n_layers=3)
    path = save_trace(tr, tmp_path / "sub" / "syn")
    back = load_trace(path)
    for name in ("experts", "weights", "seq_id", "pos", "is_prefill", "valid", "layer_ids"):
        np.testing.assert_array_equal(getattr(back, name), getattr(tr, name))
    assert back.metadata["model"] == tr.metadata["model"]
    meta = json.loads((tmp_path / "sub" / "syn.json").read_text())
    assert meta["arrays"]["experts"] == ["int16", [18, 3, 2]]


def test_real_mixtral(mixtral_trace_path: Path) -> None:
    meta = json.loads(mixtral_trace_path.with_suffix(".json").read_text())
    tr = load_trace(mixtral_trace_path)
    assert tr.experts.shape == tuple(meta["arrays"]["experts"][1])
    assert (tr.n_layers, tr.top_k, tr.n_experts) == (meta["n_layers"], meta["top_k"], meta["n_experts"])
    assert tr.n_skipped > 0 and tr.n_invalid_rows > 0
    fw = tr.forwards()
    assert fw[0].is_prefill and fw[0].n_tokens == 135 and fw[0].seq == 0
    assert all(f.n_tokens == 1 and not f.is_prefill for f in fw[1:])
    assert tr.requests() == [0, 1, 2, 3]
    sub = tr.select([1])
    assert sub.requests() == [1] and sub.n_tokens == int((tr.seq_id == 1).sum())
    counts = tr.expert_counts()
    assert counts.shape == (32, 8) and counts.sum() == tr.usable.sum()
    r = tr.layer_routing(fw[0], 3)
    assert r.is_prefill and r.n_rows == 135 and sum(r.tokens) == int(tr.usable[fw[0].rows, 3].sum())


def test_real_qwen_groups_by_step(qwen_trace_path: Path) -> None:
    tr = load_trace(qwen_trace_path)
    assert (tr.n_tokens, tr.n_layers, tr.top_k, tr.n_experts) == (4384, 1, 4, 60)
    fw = tr.forwards()
    assert len(fw) == 129
    assert [f.n_tokens for f in fw[:2]] == [65, 1406] and fw[0].is_prefill and not fw[2].is_prefill
    assert sum(f.n_tokens for f in fw) == tr.n_tokens
    assert tr.requests() == []


def test_invalid_rows_route_as_minus_one() -> None:
    tr = synthetic_trace("mixtral-8x7b", n_requests=1, prompt_len=3, decode_len=2, n_layers=2)
    valid = np.ones((5, 2), bool)
    valid[1, 0] = False
    tr2 = Trace(experts=tr.experts, weights=tr.weights, seq_id=tr.seq_id, pos=tr.pos,
                is_prefill=tr.is_prefill, valid=valid, metadata=tr.metadata)
    r = tr2.layer_routing(tr2.forwards()[0], 0)
    assert (r.topk_ids[1] == -1).all() and r.topk_scores[1].sum() == 0
    assert tr2.n_skipped == 2 and tr2.expert_counts()[0].sum() == 8


def test_import_does_not_load_torch() -> None:
    import subprocess

    code = "import sys, hybrimoe_kt.traces, hybrimoe_kt.traces.stats, hybrimoe_kt.traces.synthetic, " \
           "hybrimoe_kt.traces.spec; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
