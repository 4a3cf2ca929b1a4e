"""Hardware profiles: JSON data describing the CPU tier, the GPU tier and the PCIe link.

A profile is a roofline per tier (memory bandwidth, compute throughput, fixed overheads) plus the link.
Presets live in ``core/profiles/<name>.json`` with the sources of every number; ``hybrimoe-kt
calibrate`` writes the same schema from measurements. Unknown keys are errors.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Optional

from hybrimoe_kt.core.host import HostCosts

PRESET_NAMES = ("rtx4090-ddr5", "a6000-tr5995wx", "rtx4080-2x8452y", "rtx5090-ddr5", "rtx3090-ddr4",
                "a6000-xeon10")


@dataclass(frozen=True, slots=True)
class Tier:
    """Roofline of one compute tier for expert FFNs: time(n) = expert_overhead + max(bytes/bw, flops/F)."""

    mem_bw_gbs: float        # effective weight-read bandwidth, GB/s
    tflops: float            # effective matmul throughput for expert FFNs, TFLOP/s
    expert_overhead_us: float = 0.0  # fixed cost per expert per call
    call_overhead_us: float = 0.0    # fixed cost per layer call with at least one expert on this tier

    def __post_init__(self) -> None:
        for f in ("mem_bw_gbs", "tflops"):
            if not getattr(self, f) > 0:
                raise ValueError(f"{f} must be > 0, got {getattr(self, f)}")
        for f in ("expert_overhead_us", "call_overhead_us"):
            if getattr(self, f) < 0:
                raise ValueError(f"{f} must be >= 0, got {getattr(self, f)}")


@dataclass(frozen=True, slots=True)
class Link:
    bw_gbs: float            # effective host-to-device bandwidth (pinned), GB/s
    latency_us: float = 0.0  # fixed cost per copy

    def __post_init__(self) -> None:
        if not self.bw_gbs > 0 or self.latency_us < 0:
            raise ValueError(f"pcie needs bw_gbs > 0 and latency_us >= 0, got {self}")


@dataclass(frozen=True, slots=True)
class HardwareProfile:
    name: str
    cpu: Tier
    gpu: Tier
    pcie: Link
    layer_overhead_us: float = 0.0  # non-MoE GPU work per layer beyond weight reads (launches, norms)
    gpu_mem_gib: float = 0.0        # GPU memory; 0 = unknown (no budget check)
    host: Optional[HostCosts] = None  # host time per layer call, per strategy and phase
    description: str = ""
    sources: tuple[str, ...] = ()
    measured: Mapping[str, Any] = field(default_factory=dict)  # raw calibration data, provenance

    def __post_init__(self) -> None:
        if self.gpu_mem_gib < 0:
            raise ValueError(f"gpu_mem_gib must be >= 0, got {self.gpu_mem_gib}")

    def to_json(self) -> str:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("host",)}
        d = {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in d.items()}
        d["sources"] = list(self.sources)
        d["measured"] = dict(self.measured)
        if self.host is not None:
            d["host"] = self.host.to_dict()
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @staticmethod
    def from_dict(d: Mapping[str, Any], origin: str = "<dict>") -> "HardwareProfile":
        try:
            _check_keys(d, HardwareProfile, origin, "")
            _check_keys(d["cpu"], Tier, origin, "cpu.")
            _check_keys(d["gpu"], Tier, origin, "gpu.")
            _check_keys(d["pcie"], Link, origin, "pcie.")
            return HardwareProfile(
                name=str(d["name"]),
                cpu=Tier(**d["cpu"]),
                gpu=Tier(**d["gpu"]),
                pcie=Link(**d["pcie"]),
                layer_overhead_us=float(d.get("layer_overhead_us", 0.0)),
                gpu_mem_gib=float(d.get("gpu_mem_gib", 0.0)),
                host=HostCosts.from_dict(d["host"]) if d.get("host") is not None else None,
                description=str(d.get("description", "")),
                sources=tuple(d.get("sources", ())),
                measured=dict(d.get("measured", {})),
            )
        except KeyError as e:
            raise ValueError(f"hardware profile {origin}: missing key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"hardware profile {origin}: {e}") from None


def _check_keys(d: Any, cls: type, origin: str, prefix: str) -> None:
    if not isinstance(d, Mapping):
        raise ValueError(f"{prefix or 'profile'} must be a JSON object, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(prefix + k for k in unknown)}; "
                         f"allowed: {', '.join(sorted(known))}")


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """Load a preset by name (``rtx4090-ddr5``) or a profile JSON file by path."""
    s = str(name_or_path)
    if s in PRESET_NAMES:
        text = resources.files("hybrimoe_kt.core").joinpath("profiles", f"{s}.json").read_text()
        return HardwareProfile.from_dict(json.loads(text), origin=f"preset {s}")
    path = Path(s)
    if not path.is_file():
        raise ValueError(f"hardware profile {s!r} is neither a preset ({', '.join(PRESET_NAMES)}) "
                         f"nor an existing JSON file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"hardware profile {path}: invalid JSON ({e})") from None
    return HardwareProfile.from_dict(data, origin=str(path))
