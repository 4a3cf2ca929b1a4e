"""The generation helper and the runtime-setting overrides, on a tiny Mixtral."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hybrimoe_kt.kt.ab_compare import agreement, ratios
from hybrimoe_kt.kt.generation import generate
from hybrimoe_kt.kt.loader import load_hybrid
from hybrimoe_kt.kt.rule_strategy import rule_strategy
from hybrimoe_kt.kt.rules import load_rules

RULES = Path(__file__).resolve().parents[2] / "optimize_rules"


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hybrimoe_kt.kt.tiny import make_tiny_model

    return Path(make_tiny_model("mixtral", tmp_path_factory.mktemp("gen") / "mixtral", seed=2)["dir"])


def test_greedy_matches_transformers_and_counts_this_generation(tiny_mixtral: Path) -> None:
    hm = load_hybrid(tiny_mixtral, RULES / "Mixtral-hybrimoe.yaml", progress=False, overrides={"cpu_threads": 1})
    ids = hm.tokenizer("the quick brown fox").input_ids
    pieces: list[str] = []
    first = generate(hm, ids, 6, on_text=pieces.append, stop_on_eos=False)
    with torch.no_grad():
        want = hm.model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    assert first.tokens == want and "".join(pieces) == first.text
    again = generate(hm, ids, 6, stop_on_eos=False)
    c = again.counters  # deltas: this generation only (6 forwards x 4 MoE layers)
    assert c.forwards == 6 * 4 and c.cpu_experts + c.gpu_experts > 0 and 0.0 <= c.hit_rate <= 1.0
    assert again.decode_forwards == 5 and again.prompt_tokens == len(ids)
    sampled = generate(hm, ids, 4, temperature=0.9, top_p=0.9, seed=5, stop_on_eos=False)
    assert sampled.tokens == generate(hm, ids, 4, temperature=0.9, top_p=0.9, seed=5, stop_on_eos=False).tokens


def test_overrides_set_cpu_threads_and_reject_unknown_names(tiny_mixtral: Path) -> None:
    hm = load_hybrid(tiny_mixtral, RULES / "Mixtral-stock.yaml", progress=False, overrides={"cpu_threads": 1})
    assert all(getattr(b, "n_threads", 1) == 1 for b in hm.runtime.cpu)
    with pytest.raises(ValueError, match="unknown runtime setting"):
        load_hybrid(tiny_mixtral, RULES / "Mixtral-stock.yaml", progress=False, overrides={"threads": 1})


def test_rule_strategy_agreement_ratios() -> None:
    assert rule_strategy(load_rules(RULES / "Mixtral-stock.yaml")).strategy == "stock"
    hy = rule_strategy(load_rules(RULES / "Mixtral-hybrimoe.yaml"))
    assert (hy.strategy, hy.cache_ratio) == ("hybrimoe", 0.25)
    assert rule_strategy(load_rules(RULES / "Mixtral-static.yaml")).strategy == "static-frequency"
    ag = agreement([[1, 2, 3], [4, 5]], [[1, 9, 3], [4, 5]])
    assert ag["overall"] == pytest.approx(4 / 5) and ag["identical_prompts"] == 1
    assert [p["first_divergence"] for p in ag["per_prompt"]] == [1, None]
    assert agreement([[1, 2]], [[1, 2, 3]])["per_prompt"][0]["first_divergence"] == 2
    assert ratios({"x": 2.0, "y": 0}, {"x": 3.0, "y": 1}, ("x", "y")) == {"x": 1.5, "y": None}
