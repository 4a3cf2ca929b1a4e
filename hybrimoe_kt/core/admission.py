"""Admission rules: may a transferred expert take a GPU slot (possibly evicting a resident one)?

Demand loads are always admitted (the expert is computed from the slot it is copied into); the rule
governs background copies: CPU-served misses copied after the fact, and prefetches.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Protocol, get_args

from hybrimoe_kt.core.protocols import EvictionPolicy
from hybrimoe_kt.core.types import ExpertId, LayerRouting

AdmissionName = Literal["always", "never", "better-than-victim", "expected-reuse"]


class AdmissionRule(Protocol):
    """``observe`` sees every layer's routing (before the plan); ``admit`` decides one copy. ``bonus``
    is extra expected activations the caller knows of (a prefetcher's prediction); rules that do not
    price copies ignore it."""

    name: str

    def observe(self, routing: LayerRouting) -> None: ...

    def worth(self, eid: ExpertId, policy: EvictionPolicy, bonus: float = 0.0) -> bool:
        """False when no victim could make the copy worth it (checked before searching a victim)."""
        ...

    def admit(self, eid: ExpertId, victim: Optional[ExpertId], policy: EvictionPolicy,
              bonus: float = 0.0) -> bool: ...


class _Stateless:
    def observe(self, routing: LayerRouting) -> None:
        pass

    def worth(self, eid: ExpertId, policy: EvictionPolicy, bonus: float = 0.0) -> bool:
        return True


class AdmitAlways(_Stateless):
    name = "always"

    def admit(self, eid: ExpertId, victim: Optional[ExpertId], policy: EvictionPolicy,
              bonus: float = 0.0) -> bool:
        return True


class AdmitNever(_Stateless):
    name = "never"

    def worth(self, eid: ExpertId, policy: EvictionPolicy, bonus: float = 0.0) -> bool:
        return False

    def admit(self, eid: ExpertId, victim: Optional[ExpertId], policy: EvictionPolicy,
              bonus: float = 0.0) -> bool:
        return False


class AdmitBetterThanVictim(_Stateless):
    """Take a free slot; replace a resident only if the newcomer outscores it by more than ``margin``
    (a copy costs PCIe time and host-memory bandwidth, so a near-tie is not worth a swap)."""

    name = "better-than-victim"

    def __init__(self, margin: float = 0.0) -> None:
        if margin < 0:
            raise ValueError(f"admission margin must be >= 0, got {margin}")
        self.margin = margin

    def admit(self, eid: ExpertId, victim: Optional[ExpertId], policy: EvictionPolicy,
              bonus: float = 0.0) -> bool:
        return victim is None or policy.score(eid) > policy.score(victim) + self.margin


class AdmitExpectedReuse:
    """Copy only when the swap is expected to pay for itself.

    With a policy whose score is a per-token activation rate (``reuse``), ``(s_new - s_victim) *
    horizon`` is how many more GPU hits the swap should bring over a residency of ``horizon`` tokens.
    A copy reads the expert from host memory once, as one CPU computation of it would, and saves about
    one host-memory read per extra hit: so the swap pays when the expected extra hits exceed
    ``threshold`` (1 = break-even on host-memory traffic). A free slot is treated as a victim of
    score 0. ``bonus`` adds activations expected beyond the rate (a prefetch's predicted use at its
    target layer).

    The rates come from ``estimator`` (an object with ``on_route`` and ``score``, e.g. a ``ReuseRate``
    fed through ``observe``) when given, so that any eviction policy can rank the residents while
    admission prices the swap; without one, the eviction policy's own score is taken as the rate.
    """

    name = "expected-reuse"

    def __init__(self, margin: float = 1.0, horizon: float = 32.0, estimator: Any = None) -> None:
        if margin < 0 or horizon <= 0:
            raise ValueError(f"expected-reuse needs threshold >= 0 and horizon > 0, got {margin}, {horizon}")
        self.threshold = margin
        self.horizon = horizon
        self.estimator = estimator

    def observe(self, routing: LayerRouting) -> None:
        if self.estimator is not None:
            self.estimator.on_route(routing)

    def worth(self, eid: ExpertId, policy: EvictionPolicy, bonus: float = 0.0) -> bool:
        """Rates are >= 0, so a free slot (victim score 0) is the best case."""
        return (self.estimator or policy).score(eid) * self.horizon + bonus > self.threshold

    def admit(self, eid: ExpertId, victim: Optional[ExpertId], policy: EvictionPolicy,
              bonus: float = 0.0) -> bool:
        rate = (self.estimator or policy).score
        old = rate(victim) if victim is not None else 0.0
        return (rate(eid) - old) * self.horizon + bonus > self.threshold


ADMISSION_RULES: dict[str, type] = {
    "always": AdmitAlways,
    "never": AdmitNever,
    "better-than-victim": AdmitBetterThanVictim,
    "expected-reuse": AdmitExpectedReuse,
}
assert set(ADMISSION_RULES) == set(get_args(AdmissionName))


def make_admission(name: str, margin: float = 0.0, horizon: float = 32.0,
                   estimator: Any = None) -> AdmissionRule:
    try:
        cls = ADMISSION_RULES[name]
    except KeyError:
        raise ValueError(f"unknown admission rule {name!r}; known: {', '.join(ADMISSION_RULES)}") from None
    if cls is AdmitExpectedReuse:
        return AdmitExpectedReuse(margin, horizon, estimator)
    return cls(margin) if cls is AdmitBetterThanVictim else cls()
