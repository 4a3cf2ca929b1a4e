"""What a rule file asks of the hybrid runtime: its strategy and GPU expert budget, read from the rules
alone (no model), so the simulator can replay the same configuration on another hardware profile."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from hybrimoe_kt.kt.operators import HybriMoEExperts
from hybrimoe_kt.kt.rules import Rule

DEFAULT_CACHE_RATIO = 0.25  # the operator's budget when a rule gives none


@dataclass(frozen=True)
class RuleStrategy:
    strategy: str
    cache_ratio: Optional[float]   # None when the budget is given in slots or GiB instead
    operator: str                  # dotted class path of the HybriMoE operator
    rule_index: int


def rule_strategy(rules: Sequence[Rule]) -> RuleStrategy:
    """The strategy of the first rule that installs a HybriMoE operator: its ``strategy`` kwarg, else the
    operator class's default; the cache ratio likewise. ValueError when no rule installs one."""
    for rule in rules:
        cls = rule.replace_class
        if cls is None or not (isinstance(cls, type) and issubclass(cls, HybriMoEExperts)):
            continue
        kw = rule.kwargs
        strategy = str(kw.get("strategy", cls.DEFAULT_STRATEGY))
        if kw.get("cache_ratio") is not None:
            ratio: Optional[float] = float(kw["cache_ratio"])
        elif kw.get("gpu_slots") is None and kw.get("gpu_gib") is None:
            ratio = DEFAULT_CACHE_RATIO
        else:
            ratio = None
        return RuleStrategy(strategy, ratio, rule.replace_class_path, rule.index)
    source = rules[0].source if rules else "<rules>"
    raise ValueError(f"{source}: no rule installs a HybriMoE operator "
                     f"(hybrimoe_kt.kt.operators.HybriMoEExperts or a subclass)")
