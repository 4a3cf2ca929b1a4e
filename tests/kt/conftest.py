"""A tiny Mixtral model folder (config.json only) shared by the rule-engine tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import MixtralConfig

    d = tmp_path_factory.mktemp("mixtral") / "tiny-mixtral"
    MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_local_experts=4,
                  num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=128).save_pretrained(d)
    return d
