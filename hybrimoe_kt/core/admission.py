"""Admission rules: may a transferred expert take a GPU slot (possibly evicting a resident one)?

Demand loads are always admitted (the expert is computed from the slot it is copied into); the rule
governs background copies: CPU-served misses copied after the fact, and prefetches.
"""

from __future__ import annotations

from typing import Literal, Optional, Protocol, get_args

from hybrimoe_kt.core.protocols import EvictionPolicy
from hybrimoe_kt.core.types import ExpertId

AdmissionName = Literal["always", "never", "better-than-victim"]


class AdmissionRule(Protocol):
    name: str

    def admit(self, eid: ExpertId, victim: Optional[ExpertId], policy: EvictionPolicy) -> bool: ...


class AdmitAlways:
    name = "always"

    def admit(self, eid: ExpertId, victim: Optional[ExpertId], policy: EvictionPolicy) -> bool:
        return True


class AdmitNever:
    name = "never"

    def admit(self, eid: ExpertId, victim: Optional[ExpertId], policy: EvictionPolicy) -> bool:
        return False


class AdmitBetterThanVictim:
    """Take a free slot; replace a resident only if the newcomer scores strictly higher."""

    name = "better-than-victim"

    def admit(self, eid: ExpertId, victim: Optional[ExpertId], policy: EvictionPolicy) -> bool:
        return victim is None or policy.score(eid) > policy.score(victim)


ADMISSION_RULES: dict[str, type] = {
    "always": AdmitAlways,
    "never": AdmitNever,
    "better-than-victim": AdmitBetterThanVictim,
}
assert set(ADMISSION_RULES) == set(get_args(AdmissionName))


def make_admission(name: str) -> AdmissionRule:
    try:
        return ADMISSION_RULES[name]()
    except KeyError:
        raise ValueError(f"unknown admission rule {name!r}; known: {', '.join(ADMISSION_RULES)}") from None
