"""Host time per MoE layer call, per strategy and phase: the ``host`` section of a hardware profile.

The runtime's own Python work per layer is part of what a strategy costs (the released HybriMoE lost
4x to stock kTransformers on it). Two parts, in microseconds per layer call:

- ``critical_us``: host work the layer's kernels wait for or that follows them on the same thread:
  routing to the host, deciding, dispatching, and after the kernels the sync and the sum of the tiers.
  It delays the layer in full.
- ``background_us``: work decided while the kernels run (background copies: admissions, prefetches).
  Only what exceeds the layer's kernel time delays the layer.
- ``upkeep_us`` (optional, 0 when absent): a step-cadence strategy's cache upkeep between decode steps
  (``core.upkeep``), amortized per layer call. It runs on the host thread before the step's first
  layer, so the simulator charges ``upkeep_us`` times the step's layers before the step in full.
- ``stream_us`` (optional, prefill, 0 when absent): what pricing the next layer's stream
  (``core.stream``) adds to a layer call that prices it (``Controller.prices_stream``), on top of
  ``critical_us``; it delays the layer in full. Measured as the strategy's prefill critical time minus
  that of the same strategy without streaming.

``hybrimoe-kt calibrate`` measures them from the runtime itself (kernels as no-ops); presets carry an
estimate scaled from such a measurement, with the factor and its source. Bounds (``oracle``,
``roofline``) are charged no host time: they bound what any implementation could reach.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

Phase = Literal["decode", "prefill"]
PHASES: tuple[Phase, ...] = ("decode", "prefill")
HOST_FREE = ("oracle", "roofline")  # bounds: no host time


@dataclass(frozen=True, slots=True)
class HostTime:
    """Seconds of host time per layer call (``critical``, ``background``, amortized ``upkeep``)."""

    critical: float = 0.0
    background: float = 0.0
    upkeep: float = 0.0
    stream: float = 0.0

    def __post_init__(self) -> None:
        if self.critical < 0 or self.background < 0 or self.upkeep < 0 or self.stream < 0:
            raise ValueError(f"host times must be >= 0, got critical {self.critical}, background "
                             f"{self.background}, upkeep {self.upkeep}, stream {self.stream}")


ZERO_HOST = HostTime()


@dataclass(frozen=True)
class HostCosts:
    """Per strategy and phase: the host time of one layer call (microseconds in JSON)."""

    strategies: Mapping[str, Mapping[str, HostTime]]
    scale: float = 1.0      # factor applied to the measurement the numbers come from
    source: str = ""        # where the numbers (and the factor) come from
    measured: Mapping[str, Any] = field(default_factory=dict)  # raw figures, provenance

    def get(self, strategy: str, phase: Phase, profile_name: str = "this profile") -> HostTime:
        if strategy in HOST_FREE:
            return ZERO_HOST
        try:
            return self.strategies[strategy][phase]
        except KeyError:
            raise ValueError(f"{profile_name} has no {phase} host time for strategy {strategy!r} (it has "
                             f"{', '.join(sorted(self.strategies)) or 'none'}): measure it with "
                             f"'hybrimoe-kt calibrate', or pass --host-cost zero for an ablation") from None

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "source": self.source, "measured": dict(self.measured),
                "strategies": {s: {p: {"critical_us": round(t.critical * 1e6, 3),
                                       "background_us": round(t.background * 1e6, 3),
                                       **({"upkeep_us": round(t.upkeep * 1e6, 3)} if t.upkeep else {}),
                                       **({"stream_us": round(t.stream * 1e6, 3)} if t.stream else {})}
                                   for p, t in phases.items()}
                               for s, phases in sorted(self.strategies.items())}}

    @staticmethod
    def from_dict(d: Any) -> "HostCosts":
        if not isinstance(d, Mapping):
            raise ValueError(f"host must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - {"scale", "source", "measured", "strategies"})
        if unknown:
            raise ValueError(f"unknown key(s) host.{', host.'.join(unknown)}; allowed: measured, scale, "
                             f"source, strategies")
        strategies: dict[str, dict[str, HostTime]] = {}
        raw = d.get("strategies", {})
        if not isinstance(raw, Mapping):
            raise ValueError("host.strategies must be an object {strategy: {phase: {...}}}")
        for name, phases in raw.items():
            if not isinstance(phases, Mapping) or not set(phases) <= set(PHASES):
                raise ValueError(f"host.strategies.{name} must map {' and/or '.join(PHASES)} to times, "
                                 f"got {phases!r}"[:200])
            strategies[name] = {}
            for phase, t in phases.items():
                if (not isinstance(t, Mapping) or not {"critical_us", "background_us"} <= set(t)
                        or not set(t) <= {"critical_us", "background_us", "upkeep_us", "stream_us"}):
                    raise ValueError(f"host.strategies.{name}.{phase} must be {{critical_us, background_us"
                                     f"[, upkeep_us][, stream_us]}}, got {t!r}"[:200])
                strategies[name][phase] = HostTime(float(t["critical_us"]) * 1e-6,
                                                   float(t["background_us"]) * 1e-6,
                                                   float(t.get("upkeep_us", 0.0)) * 1e-6,
                                                   float(t.get("stream_us", 0.0)) * 1e-6)
        scale = float(d.get("scale", 1.0))
        if not scale > 0:
            raise ValueError(f"host.scale must be > 0, got {scale}")
        return HostCosts(strategies, scale, str(d.get("source", "")), dict(d.get("measured", {})))

    def scaled(self, factor: float, source: str) -> "HostCosts":
        """These times multiplied by ``factor`` (another machine's estimate), with the reason."""
        return HostCosts({s: {p: HostTime(t.critical * factor, t.background * factor, t.upkeep * factor,
                                          t.stream * factor)
                              for p, t in ph.items()}
                          for s, ph in self.strategies.items()}, self.scale * factor, source, self.measured)
