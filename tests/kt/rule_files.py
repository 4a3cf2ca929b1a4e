"""Which optimize-rules file belongs to each model family (``optimize_rules/<NAME>-<kind>.yaml``)."""

from __future__ import annotations

from pathlib import Path

from hybrimoe_kt.kt.families import FAMILIES

RULES_DIR = Path(__file__).resolve().parents[2] / "optimize_rules"
RULE_NAMES = {"mixtral": "Mixtral", "qwen2-moe": "Qwen2-MoE", "qwen3-moe": "Qwen3-MoE",
              "deepseek-v2": "DeepSeek-V2", "deepseek-v3": "DeepSeek-V3", "olmoe": "OLMoE"}
assert set(RULE_NAMES) == set(FAMILIES)


def rule_file(family: str, kind: str) -> Path:
    """``kind``: stock, static or hybrimoe."""
    return RULES_DIR / f"{RULE_NAMES[family]}-{kind}.yaml"
