"""Folds keep calibration and replay apart: leave one request out, or halves of a batched log."""

from __future__ import annotations

import numpy as np
import pytest

from hybrimoe_kt.sim.folds import Fold, make_folds
from hybrimoe_kt.traces.format import Trace
from hybrimoe_kt.traces.synthetic import as_batched, synthetic_trace

N_LAYERS, N_EXPERTS, TOP_K = 2, 8, 2


def meta() -> dict:
    return {"model": "test", "n_layers": N_LAYERS, "n_experts": N_EXPERTS, "top_k": TOP_K,
            "n_shared_experts": 0, "weights_meaning": "none", "source": "tests/sim/test_folds.py",
            "licence": "test data"}


def three_request_trace() -> Trace:
    """Requests 0, 1, 2, each 3 prompt tokens + 2 decode tokens. Request 1 alone uses experts 6 and 7;
    requests 0 and 2 only use experts 0..5."""
    rng = np.random.default_rng(0)
    rows, seq, pos, pre = [], [], [], []
    for req in range(3):
        for t in range(5):
            tok = []
            for _ in range(N_LAYERS):
                pool = [6, 7] if req == 1 else list(range(6))
                tok.append(rng.choice(pool, size=TOP_K, replace=False))
            rows.append(tok)
            seq.append(req)
            pos.append(t)
            pre.append(t < 3)
    return Trace(experts=np.array(rows), seq_id=np.array(seq), pos=np.array(pos),
                 is_prefill=np.array(pre), metadata=meta())


def test_leave_one_request_out_counts() -> None:
    trace = three_request_trace()
    folds = make_folds(trace)
    assert [f.name for f in folds] == ["request 0", "request 1", "request 2"]
    for req, fold in zip(trace.requests(), folds):
        others = np.flatnonzero(trace.seq_id != req)
        np.testing.assert_array_equal(fold.counts, trace.expert_counts(others))
        mine = trace.expert_counts(np.flatnonzero(trace.seq_id == req))
        # the replayed tokens are never counted: counts + own counts = the whole trace
        np.testing.assert_array_equal(fold.counts + mine, trace.expert_counts())
        # the fold replays exactly this request: one prefill forward + 2 decode forwards
        assert [s.request for s in fold.steps] == [req] * 3
        assert [(s.n_rows, s.is_prefill) for s in fold.steps] == [(3, True), (1, False), (1, False)]
    # request 1 is the only user of experts 6 and 7: its calibration never saw them
    assert folds[1].counts[:, 6:].sum() == 0
    assert trace.expert_counts()[:, 6:].sum() == 5 * N_LAYERS * TOP_K
    # and the other folds did see them (from request 1's rows)
    assert folds[0].counts[:, 6:].sum() == 5 * N_LAYERS * TOP_K


def test_replayed_routing_is_the_requests_own() -> None:
    trace = three_request_trace()
    fold = make_folds(trace)[1]
    for step in fold.steps:
        for r in step.routings:
            assert set(r.experts) <= {6, 7}


def test_unknown_seq_ids_split_into_halves() -> None:
    base = synthetic_trace("mixtral-8x7b", n_requests=2, prompt_len=4, decode_len=5, n_layers=2)
    batched = as_batched(base)
    assert (batched.seq_id == -1).all() and batched.step is not None
    forwards = batched.forwards()
    assert len(forwards) == 2 + 5  # two prompt steps, then 5 batched decode steps
    folds = make_folds(batched)
    assert [f.name for f in folds] == ["half 1 of 2", "half 2 of 2"]
    half = len(forwards) // 2
    parts = [forwards[:half], forwards[half:]]
    for i, fold in enumerate(folds):
        assert len(fold.steps) == len(parts[i])
        assert [s.n_rows for s in fold.steps] == [f.n_tokens for f in parts[i]]
        other_rows = np.concatenate([f.rows for f in parts[1 - i]])
        np.testing.assert_array_equal(fold.counts, batched.expert_counts(other_rows))
    # the two halves' calibration counts add up to the whole trace
    np.testing.assert_array_equal(folds[0].counts + folds[1].counts, batched.expert_counts())


def test_single_forward_trace_cannot_be_split() -> None:
    one = Trace(experts=np.zeros((3, N_LAYERS, TOP_K)) + np.array([0, 1]), seq_id=np.full(3, -1),
                pos=np.full(3, -1), is_prefill=np.ones(3, bool), metadata=meta(), step=np.zeros(3))
    with pytest.raises(ValueError, match="two"):
        make_folds(one)


def test_prefill_is_chunked() -> None:
    trace = synthetic_trace("mixtral-8x7b", n_requests=2, prompt_len=10, decode_len=3, n_layers=2)
    fold = make_folds(trace, prefill_chunk=4)[0]
    assert [(s.n_rows, s.is_prefill) for s in fold.steps] == [
        (4, True), (4, True), (2, True), (1, False), (1, False), (1, False)]
    # the chunks cover the prompt rows in order: their routing equals the rows' top-k
    rows = np.flatnonzero(trace.seq_id == 0)[:10]
    ids = np.concatenate([s.routings[1].topk_ids for s in fold.steps[:3]])
    np.testing.assert_array_equal(ids, trace.experts[rows, 1])
    # no chunking when the prompt fits, and a chunk must hold at least one token
    assert [s.n_rows for s in make_folds(trace, prefill_chunk=10)[0].steps][:1] == [10]
    with pytest.raises(ValueError, match="prefill chunk"):
        make_folds(trace, prefill_chunk=0)


def fold_of(trace: Trace) -> Fold:
    return make_folds(trace, prefill_chunk=4)[0]


def test_uses_and_future_agree_with_steps() -> None:
    fold = fold_of(synthetic_trace("mixtral-8x7b", n_requests=2, prompt_len=6, decode_len=5, n_layers=3))
    n_layers = 3
    uses = fold.uses()
    expected: dict[tuple[int, int], list[int]] = {}
    for i, step in enumerate(fold.steps):
        for r in step.routings:
            pos = i * n_layers + r.layer
            assert fold.future(pos) is r
            for e in r.experts:
                expected.setdefault((r.layer, e), []).append(pos)
    assert uses == expected
    for (layer, e), positions in uses.items():
        assert positions == sorted(positions)
        for pos in positions:
            routing = fold.future(pos)
            assert routing is not None and routing.layer == layer and e in routing.experts
    assert fold.future(-1) is None
    assert fold.future(len(fold.steps) * n_layers) is None
