"""``DecodeBatch`` over the tiny models: rows that join and leave between steps decode what each request
decodes alone (at the tolerance of the CPU kernel's row-count-dependent rounding, measured in
tests/server/test_batching.py), padding is trimmed when the longest row leaves, and bad calls are refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from hybrimoe_kt.decoding.batch import DecodeBatch, prefill
from hybrimoe_kt.kt.loader import load_hybrid
from hybrimoe_kt.kt.tiny import make_tiny_model

REPO = Path(__file__).resolve().parents[2]
STOCK = {"mixtral": "Mixtral-stock.yaml", "deepseek-v2": "DeepSeek-V2-stock.yaml", "qwen3-moe": "Qwen3-MoE-stock.yaml"}
TOL = 0.01  # logits; the CPU expert kernel rounds a row differently with more rows per expert


@pytest.fixture(scope="module", params=sorted(STOCK))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    d = make_tiny_model(request.param, tmp_path_factory.mktemp("batch") / request.param, seed=1)["dir"]
    return load_hybrid(d, REPO / "optimize_rules" / STOCK[request.param], progress=False)


def alone(hm: Any, ids: list[int], n: int) -> torch.Tensor:
    """Logits [n, V] of ``n`` greedy steps of one request, decoded alone."""
    logits, cache = prefill(hm.model, ids)
    b = DecodeBatch(hm.model)
    b.add(cache, len(ids))
    rows = [logits]
    for _ in range(n - 1):
        rows.append(b.step([int(rows[-1].argmax())])[0])
    return torch.stack(rows)


def test_join_and_leave(model: Any) -> None:
    tok = model.tokenizer
    prompts = [tok(p).input_ids for p in ("a b c d e f g h", "x", "hello there", "the quick brown fox jumps")]
    want = [alone(model, p, 6) for p in prompts]
    b = DecodeBatch(model.model)
    got: list[list[torch.Tensor]] = [[] for _ in prompts]
    rows: list[int] = []  # request index of each batch row
    nxt: dict[int, int] = {}
    for step in range(9):
        if step < len(prompts):  # request `step` joins
            logits, cache = prefill(model.model, prompts[step])
            b.add(cache, len(prompts[step]))
            rows.append(step)
            got[step].append(logits)
            nxt[step] = int(logits.argmax())
        done = [i for i, r in enumerate(rows) if len(got[r]) == 6]
        if done:
            width = b.width
            b.remove(done)
            rows = [r for i, r in enumerate(rows) if i not in done]
            assert b.width <= width
        if not rows:
            break
        out = b.step([nxt[r] for r in rows])
        for i, r in enumerate(rows):
            got[r].append(out[i])
            nxt[r] = int(out[i].argmax())
    for r, w in enumerate(want):
        g = torch.stack(got[r][:6])
        assert g.shape == w.shape and float((g - w).abs().max()) <= TOL, r
        assert g.argmax(-1).tolist() == w.argmax(-1).tolist()
    assert len(b) == len(rows)


def test_padding_is_trimmed(model: Any) -> None:
    tok = model.tokenizer
    long_ids, short_ids = tok(" ".join(["w"] * 30)).input_ids, tok("x").input_ids
    b = DecodeBatch(model.model)
    for ids in (long_ids, short_ids):
        b.add(prefill(model.model, ids)[1], len(ids))
    assert b.width == len(long_ids) and b.lengths == [len(long_ids), len(short_ids)]
    b.step([1, 1])
    b.remove([0])
    assert b.width == len(short_ids) + 1 and b.lengths == [len(short_ids) + 1]
    b.remove([0])
    assert len(b) == 0 and b.width == 0


def test_bad_step(model: Any) -> None:
    b = DecodeBatch(model.model)
    with pytest.raises(ValueError, match="batch of 0 rows"):
        b.step([1])
