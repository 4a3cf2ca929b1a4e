"""RoutingReplay: trace routing as router tensors (ids, renormalised weights, -1 entries, chunking)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrimoe_kt.runtime.replay import RoutingReplay
from hybrimoe_kt.traces.format import Trace
from hybrimoe_kt.traces.synthetic import synthetic_trace

META = {"model": "tiny", "n_layers": 2, "n_experts": 8, "top_k": 3, "n_shared_experts": 0,
        "weights_meaning": "test", "source": "unit test", "licence": "test"}


def small_trace(with_weights: bool = True) -> Trace:
    # request 0: 3 prompt tokens then 2 decode tokens; request 1: 1 prompt token then 1 decode token
    experts = np.array([
        [[0, 1, 2], [3, 4, 5]],
        [[1, 2, 3], [4, 5, 6]],
        [[2, 3, -1], [5, 6, 7]],
        [[3, 4, 5], [6, 7, 0]],
        [[4, 5, 6], [7, 0, 1]],
        [[5, 6, 7], [0, 1, 2]],
        [[6, 7, 0], [1, 2, 3]],
    ], dtype=np.int16)
    weights = np.full(experts.shape, 0.5, dtype=np.float16) if with_weights else None
    if weights is not None:
        weights[:, :, 0] = 2.0
    valid = np.ones((7, 2), dtype=bool)
    valid[4, 1] = False
    return Trace(experts=experts, weights=weights, valid=valid,
                 seq_id=np.array([0, 0, 0, 0, 0, 1, 1]), pos=np.array([0, 1, 2, 3, 4, 0, 1]),
                 is_prefill=np.array([1, 1, 1, 0, 0, 1, 0], dtype=bool), metadata=META)


def test_steps_follow_the_trace_forwards() -> None:
    rp = RoutingReplay(small_trace())
    assert [(s.n_tokens, s.is_prefill) for s in rp] == [(3, True), (1, False), (1, False), (1, True),
                                                         (1, False)]
    assert len(rp.steps("decode")) == 3 and len(rp.steps("prefill")) == 2
    assert "routing replayed from" in rp.label


def test_prefill_chunks() -> None:
    rp = RoutingReplay(small_trace(), prefill_chunk=2)
    sizes = [(s.n_tokens, s.forward, s.chunk) for s in rp]
    assert sizes[:2] == [(2, 0, 0), (1, 0, 1)]
    assert sum(s.n_tokens for s in rp) == 7


def test_ids_and_renormalised_weights() -> None:
    rp = RoutingReplay(small_trace())
    ids, w = rp.routing(0, 0)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert ids.shape == (3, 3) and w.shape == (3, 3)
    assert ids[0].tolist() == [0, 1, 2]
    assert ids[2].tolist() == [2, 3, -1]
    assert torch.allclose(w[0], torch.tensor([2 / 3, 1 / 6, 1 / 6]))
    assert torch.allclose(w[2], torch.tensor([0.8, 0.2, 0.0]))  # -1 entry: weight 0, rest renormalised
    assert torch.allclose(w.sum(1), torch.ones(3))


def test_invalid_row_gives_minus_one_and_zero_weight() -> None:
    rp = RoutingReplay(small_trace())
    ids, w = rp.routing(2, 1)  # trace row 4, invalid at layer 1
    assert ids.tolist() == [[-1, -1, -1]] and w.tolist() == [[0.0, 0.0, 0.0]]
    ids0, _ = rp.routing(2, 0)
    assert ids0.tolist() == [[4, 5, 6]]


def test_uniform_weights_without_trace_weights() -> None:
    rp = RoutingReplay(small_trace(with_weights=False))
    _, w = rp.routing(0, 0)
    assert torch.allclose(w[0], torch.full((3,), 1 / 3))
    assert torch.allclose(w[2], torch.tensor([0.5, 0.5, 0.0]))


def test_model_top_k_takes_leading_columns_and_checks_experts() -> None:
    rp = RoutingReplay(small_trace(), top_k=2)
    ids, w = rp.routing(0, 0)
    assert ids.shape == (3, 2) and torch.allclose(w.sum(1), torch.ones(3))
    assert torch.allclose(w[0], torch.tensor([0.8, 0.2]))
    with pytest.raises(ValueError, match="top_k"):
        RoutingReplay(small_trace(), top_k=4)
    with pytest.raises(ValueError, match="experts"):
        RoutingReplay(small_trace(), n_experts=16)
    with pytest.raises(ValueError, match="layer"):
        rp.routing(0, 2)


def test_synthetic_deepseek_replay_and_counts() -> None:
    tr = synthetic_trace("deepseek-v2-lite", n_requests=2, prompt_len=8, decode_len=4, seed=1, n_layers=3)
    rp = RoutingReplay(tr, "deepseek-v2-lite", prefill_chunk=4)
    assert len(rp.steps("prefill")) == 4 and len(rp.steps("decode")) == 8
    ids, w = rp.routing(rp.steps("decode")[0], 2)
    assert ids.shape == (1, 6) and (ids >= 0).all() and abs(float(w.sum()) - 1.0) < 1e-5
    counts = rp.expert_counts()
    assert counts.shape == (3, 64) and counts.sum() == 3 * 24 * 6
    assert np.array_equal(counts, tr.expert_counts())
    # returned tensors are copies: writing them leaves the replay unchanged
    ids[0, 0] = -1
    again, _ = rp.routing(rp.steps("decode")[0], 2)
    assert int(again[0, 0]) >= 0
