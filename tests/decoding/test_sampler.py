"""The sampler: greedy is argmax, a seed makes draws repeatable, top-p keeps only the nucleus, and bad
settings (including seeds the generator cannot take) are refused at construction."""

from __future__ import annotations

import pytest
import torch

from hybrimoe_kt.decoding.sampler import SEED_RANGE, Sampler


def test_greedy_is_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert Sampler(0.0)(logits) == 1


def test_seeded_draws_repeat() -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    a = [Sampler(1.0, 1.0, seed=7)(logits) for _ in range(1)]
    s1, s2 = Sampler(1.0, 1.0, seed=7), Sampler(1.0, 1.0, seed=7)
    assert [s1(logits) for _ in range(20)] == [s2(logits) for _ in range(20)]
    assert a[0] == Sampler(1.0, 1.0, seed=7)(logits)


def test_top_p_keeps_the_nucleus() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    s = Sampler(1.0, top_p=0.6, seed=0)
    assert {s(logits) for _ in range(200)} == {0, 1}
    assert {Sampler(1.0, top_p=0.4, seed=1)(logits) for _ in range(50)} == {0}


@pytest.mark.parametrize("kw", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5),
                                dict(temperature=1.0, seed=SEED_RANGE[1] + 1),
                                dict(temperature=1.0, seed=SEED_RANGE[0] - 1)])
def test_bad_settings(kw: dict) -> None:
    with pytest.raises(ValueError):
        Sampler(**kw)


def test_extreme_seeds_work() -> None:
    for seed in SEED_RANGE:
        Sampler(1.0, seed=seed)(torch.zeros(4))
