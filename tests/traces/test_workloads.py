"""Workload presets: stated prompt/output lengths and batches, batched forwards as one step with several
rows, leave-one-batch-out calibration, determinism, and ``simulate --workload`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hybrimoe_kt.cli import main
from hybrimoe_kt.sim.folds import make_folds
from hybrimoe_kt.traces.format import Trace
from hybrimoe_kt.traces.synthetic import synthetic_trace
from hybrimoe_kt.traces import workloads as wl
from hybrimoe_kt.traces.workloads import WORKLOADS, Workload, batched, get_workload, workload_traces

EXPECTED = {  # (prompt, output, batch) of every trace, in preset order
    "chat-32-512": [(32, 512, 1)],
    "dali-64-64": [(64, 64, 1), (64, 64, 8), (64, 64, 32)],
    "long-prefill": [(1024, 16, 1), (4096, 16, 1), (16384, 16, 1)],
    "prefill-sweep": [(32, 4, 1), (512, 4, 1), (2048, 4, 1), (8192, 4, 1)],
}
assert set(EXPECTED) == set(WORKLOADS)


def per_request(trace: Trace) -> dict[int, tuple[int, int]]:
    """(prompt tokens, decode tokens) of every request."""
    out = {}
    for r in trace.requests():
        mine = trace.seq_id == r
        out[r] = (int((mine & trace.is_prefill).sum()), int((mine & ~trace.is_prefill).sum()))
    return out


@pytest.mark.parametrize("name", list(EXPECTED))
def test_presets_generate_the_stated_shapes(name: str) -> None:
    traces = workload_traces(name, "mixtral-8x7b", seed=0, n_layers=1)
    assert [(t.prompt_len, t.output_len, t.batch) for t in traces] == EXPECTED[name]
    w = WORKLOADS[name]
    for t in traces:
        assert t.trace.metadata["workload"] == name and t.trace.metadata["batch"] == t.batch
        assert t.record_fields() == {"workload": name, "batch": t.batch, "prompt_len": t.prompt_len,
                                     "output_len": t.output_len}
        lengths = per_request(t.trace)
        assert len(lengths) == t.batch * w.groups
        assert set(lengths.values()) == {(t.prompt_len, t.output_len)}
        if t.batch == 1:
            assert t.trace.step is None  # plain request-by-request trace
        else:
            sizes = [f.n_tokens for f in t.trace.forwards()]
            per_batch = [t.batch * t.prompt_len] + [t.batch] * t.output_len
            assert sizes == per_batch * w.groups


def test_batched_decode_steps_carry_several_rows() -> None:
    base = synthetic_trace("mixtral-8x7b", n_requests=6, prompt_len=5, decode_len=4, n_layers=2, seed=1)
    b = batched(base, 3)
    fwd = b.forwards()
    assert [f.n_tokens for f in fwd] == [15, 3, 3, 3, 3] * 2 and [f.is_prefill for f in fwd[:2]] == [True, False]
    for f in fwd[1:5]:  # decode step d: the d-th decode token of requests 0, 1, 2
        assert b.seq_id[f.rows].tolist() == [0, 1, 2] and f.seq == -1
        assert len(set(b.pos[f.rows].tolist())) == 1
        np.testing.assert_array_equal(b.row[f.rows], np.arange(3))
    # routing is the source trace's, row for row
    src = {(int(s), int(p)): i for i, (s, p) in enumerate(zip(base.seq_id, base.pos))}
    idx = [src[(int(s), int(p))] for s, p in zip(b.seq_id, b.pos)]
    np.testing.assert_array_equal(b.experts, base.experts[idx])
    folds = make_folds(b, prefill_chunk=8)
    assert [f.name for f in folds] == ["batch of requests 0..2 (3)", "batch of requests 3..5 (3)"]
    for first, fold in zip((0, 3), folds):
        assert [(s.n_rows, s.is_prefill) for s in fold.steps] == [(8, True), (7, True)] + [(3, False)] * 4
        assert {s.request for s in fold.steps} == {first}
        # leave one batch out: the replayed batch's tokens are never in its calibration counts
        own = b.expert_counts(np.flatnonzero(np.isin(b.seq_id, [first, first + 1, first + 2])))
        np.testing.assert_array_equal(fold.counts + own, b.expert_counts())
    with pytest.raises(ValueError, match="divide"):
        batched(base, 4)


def test_seed_fixes_the_traces() -> None:
    a = workload_traces("dali-64-64", "qwen3-30b-a3b", seed=5, n_layers=2)
    b = workload_traces("dali-64-64", "qwen3-30b-a3b", seed=5, n_layers=2)
    c = workload_traces("dali-64-64", "qwen3-30b-a3b", seed=6, n_layers=2)
    for x, y, z in zip(a, b, c):
        np.testing.assert_array_equal(x.trace.experts, y.trace.experts)
        assert not np.array_equal(x.trace.experts, z.trace.experts)
    assert not np.array_equal(a[0].trace.experts[:64], a[1].trace.experts[:64])  # traces differ


def test_bad_workloads_are_named() -> None:
    with pytest.raises(ValueError, match="unknown workload 'chat'.*chat-32-512"):
        get_workload("chat")
    with pytest.raises(ValueError, match="groups=1"):
        Workload("x", (8,), 8, groups=1)
    with pytest.raises(ValueError, match="batches"):
        Workload("x", (8,), 8, batches=(0,))


def test_simulate_workload_records(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(wl.WORKLOADS, "tiny", Workload("tiny", (6,), 5, (1, 2), groups=2))
    out = tmp_path / "r.json"
    rc = main(["simulate", "--workload", "tiny", "--model", "deepseek-v2-lite", "--strategies",
               "stock,hybrimoe", "--cache-ratio", "0.5", "--no-progress", "--json", str(out)])
    assert rc == 0
    recs = json.loads(out.read_text())
    assert sorted({(r["workload"], r["batch"], r["prompt_len"], r["output_len"]) for r in recs}) == [
        ("tiny", 1, 6, 5), ("tiny", 2, 6, 5)]
    assert len(recs) == 4 and all(r["decode_tokens"] == 2 * r["batch"] * 5 for r in recs)
    assert "tiny/p6-o5-b2" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--workload", "chat-32-512"], "needs --model"),
    (["--workload", "chat-32-512", "--model", "mixtral-8x7b", "--trace", "x"], "pass one of them"),
    (["--workload", "nope", "--model", "mixtral-8x7b"], "unknown workload 'nope'"),
])
def test_simulate_workload_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
