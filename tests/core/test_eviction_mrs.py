"""MRS's vectorized update against the row-by-row definition, and its argument checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrimoe_kt.core.eviction import MRS
from hybrimoe_kt.core.types import LayerRouting


def slow_reference(n_experts: int, chunks: list[tuple[np.ndarray, np.ndarray]], alpha: float,
                   p: int) -> np.ndarray:
    """The definition, one token at a time, in plain Python."""
    s = [0.0] * n_experts
    for ids, scores in chunks:
        for row_ids, row_scores in zip(ids.tolist(), scores.tolist()):
            s = [(1 - alpha) * v for v in s]
            valid = [(sc, col, e) for col, (e, sc) in enumerate(zip(row_ids, row_scores)) if e >= 0]
            valid.sort(key=lambda t: (-t[0], t[1]))  # highest score first, ties by column
            for sc, _, e in valid[:p]:
                s[e] += alpha * sc
    return np.array(s)


@st.composite
def chunks(draw: st.DrawFn) -> tuple[int, int, list[tuple[np.ndarray, np.ndarray]]]:
    n_experts = draw(st.integers(1, 8))
    cols = draw(st.integers(1, n_experts))
    top_k = draw(st.integers(1, cols))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(draw(st.integers(1, 4))):
        n = draw(st.integers(1, 40))
        ids = np.stack([rng.permutation(n_experts)[:cols] for _ in range(n)])
        ids[rng.random(ids.shape) < 0.1] = -1
        scores = rng.random(ids.shape).astype(np.float32)
        out.append((ids, scores))
    return n_experts, top_k, out


@settings(max_examples=200, deadline=None)
@given(data=chunks(), alpha=st.floats(0.01, 1.0), p=st.one_of(st.none(), st.integers(1, 10)))
def test_vectorized_matches_the_row_by_row_definition(data, alpha: float, p) -> None:
    n_experts, top_k, cs = data
    pol = MRS(1, n_experts, top_k=top_k, alpha=alpha, p=p)
    for ids, scores in cs:
        pol.on_route(LayerRouting.from_topk(0, ids, scores, is_prefill=ids.shape[0] > 1, top_k=top_k))
    expected = slow_reference(n_experts, cs, alpha, pol.p)
    np.testing.assert_allclose(pol.scores[0], expected, rtol=1e-9, atol=1e-12)


def test_other_layers_are_untouched() -> None:
    pol = MRS(3, 4, top_k=1)
    pol.on_route(LayerRouting.from_topk(1, np.array([[2, 3]]), np.array([[0.5, 0.25]]), top_k=1))
    assert pol.scores[0].tolist() == [0.0] * 4 and pol.scores[2].tolist() == [0.0] * 4
    assert pol.scores[1].tolist() == [0.0, 0.0, 0.25, 0.125]


def test_long_prefill_does_not_overflow() -> None:
    pol = MRS(1, 2, top_k=1)
    n = 5000
    pol.on_route(LayerRouting.from_topk(0, np.zeros((n, 1), dtype=np.int64), np.ones((n, 1)), top_k=1))
    assert pol.score((0, 0)) == pytest.approx(1.0)
    assert np.all(np.isfinite(pol.scores))


@pytest.mark.parametrize("kwargs, match", [
    ({"top_k": 0}, "top_k"),
    ({"top_k": 2, "alpha": 0.0}, "alpha"),
    ({"top_k": 2, "alpha": 1.5}, "alpha"),
    ({"top_k": 2, "p": 0}, "p must"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MRS(2, 4, **kwargs)


def test_routing_outside_the_model_is_rejected() -> None:
    pol = MRS(1, 4, top_k=1)
    with pytest.raises(ValueError, match="expert 7"):
        pol.on_route(LayerRouting.from_topk(0, np.array([[7]]), top_k=1))
    with pytest.raises(ValueError, match="non-finite"):
        pol.on_route(LayerRouting.from_topk(0, np.array([[1]]), np.array([[np.nan]]), top_k=1))
    with pytest.raises(ValueError, match="layer 2"):
        pol.on_route(LayerRouting.from_topk(2, np.array([[1]]), top_k=1))
