"""The incremental detokenizer: its pieces join to the tokenizer's own decode of the whole list (random
token sequences of the tiny models' tokenizers, byte-level pieces included), stop strings cut exactly
and are never emitted in part, and the work per token stays bounded (no re-decode of the whole text)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from hybrimoe_kt.decoding.detokenizer import Detokenizer
from hybrimoe_kt.kt.tiny import make_tiny_model


@pytest.fixture(scope="module", params=["mixtral", "deepseek-v2"])
def tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    d = make_tiny_model(request.param, tmp_path_factory.mktemp("tok") / request.param, seed=0)["dir"]
    return AutoTokenizer.from_pretrained(Path(d))


def run(tok: Any, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[str, bool, Detokenizer]:
    d = Detokenizer(tok, stop)
    out, stopped = "", False
    for t in ids:
        piece, stopped = d.add(t)
        out += piece
        if stopped:
            break
    return out + d.flush(), stopped, d


def test_pieces_join_to_the_full_decode(tokenizer: Any) -> None:
    rng = random.Random(0)
    n = len(tokenizer)
    for _ in range(300):
        ids = [rng.randrange(n) for _ in range(rng.randrange(1, 48))]
        text, stopped, d = run(tokenizer, ids)
        assert not stopped and text == tokenizer.decode(ids, skip_special_tokens=True) == d.text, ids


def test_no_half_character_is_emitted(tokenizer: Any) -> None:
    ids = tokenizer("héllo wörld ünïcode", add_special_tokens=False).input_ids
    d = Detokenizer(tokenizer)
    pieces = [d.add(t)[0] for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + d.flush() == tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_strings_cut_and_are_held_back(tokenizer: Any) -> None:
    ids = tokenizer("alpha beta gamma delta epsilon", add_special_tokens=False).input_ids
    full = tokenizer.decode(ids, skip_special_tokens=True)
    for stop in ("gamma", "a d", "silon", "zzz"):
        d = Detokenizer(tokenizer, (stop,))
        pieces, stopped = [], False
        for t in ids:
            piece, stopped = d.add(t)
            pieces.append(piece)
            assert stop not in "".join(pieces)
            if stopped:
                break
        text = "".join(pieces) + d.flush()
        want = full[:full.find(stop)] if stop in full else full
        assert text == want and stopped == (stop in full), (stop, text)


def test_work_per_token_is_bounded(tokenizer: Any) -> None:
    decoded: list[int] = []
    real = tokenizer.decode

    class Counting:
        def decode(self, ids: list[int], **kw: Any) -> str:
            decoded.append(len(ids))
            return real(ids, **kw)

    ids = tokenizer(" ".join(["word"] * 400), add_special_tokens=False).input_ids
    d = Detokenizer(Counting())
    for t in ids:
        d.add(t)
    assert max(decoded) <= 16, max(decoded)  # a short window, never the whole text
    assert d.text == real(ids, skip_special_tokens=True)
