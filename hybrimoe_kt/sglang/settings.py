"""The plugin's settings inside sglang-kt: environment variables, optionally a config file.

sglang-kt's own flags keep their meaning: ``--kt-num-gpu-experts`` (or ``--kt-gpu-experts-ratio``)
sizes each layer's GPU expert slots, which is the plugin's cache budget, and
``--kt-expert-placement-strategy`` picks the experts the slots hold at load time, where the plugin's
strategy starts from. The plugin adds:

- ``HYBRIMOE_STRATEGY``: the strategy deciding the GPU experts (default ``hybrimoe``; it must keep
  decode free of per-layer policy work, i.e. the step cadence of ``core.upkeep``);
- ``HYBRIMOE_HARDWARE``: a hardware profile preset or a calibrated profile JSON for the cost model
  (default ``rtx4090-ddr5``; ``hybrimoe-kt calibrate`` measures one);
- ``HYBRIMOE_CPU_FORMAT``: the CPU experts' format for the cost model (default ``bf16``);
- ``HYBRIMOE_MAX_DECODE_ROWS``: decode rows the routing recorder holds (default 256; larger decode
  batches are not recorded);
- ``HYBRIMOE_DISABLE=1``: leave sglang-kt's layers as they are;
- ``HYBRIMOE_CONFIG``: a JSON or YAML file with the keys ``strategy``, ``hardware``, ``cpu_format``,
  ``max_decode_rows``, ``enabled`` (unknown keys are errors); an environment variable overrides the
  file's value.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional

from hybrimoe_kt.core.models import BITS_PER_WEIGHT
from hybrimoe_kt.core.strategies import StrategySpec, get_strategy, with_overrides

ENV = {"strategy": "HYBRIMOE_STRATEGY", "hardware": "HYBRIMOE_HARDWARE", "cpu_format": "HYBRIMOE_CPU_FORMAT",
       "max_decode_rows": "HYBRIMOE_MAX_DECODE_ROWS"}
CONFIG_ENV = "HYBRIMOE_CONFIG"
DISABLE_ENV = "HYBRIMOE_DISABLE"
KEYS = ("strategy", "hardware", "cpu_format", "max_decode_rows", "enabled")


@dataclass(frozen=True)
class PluginSettings:
    strategy: str = "hybrimoe"
    hardware: str = "rtx4090-ddr5"
    cpu_format: str = "bf16"
    max_decode_rows: int = 256
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.cpu_format not in BITS_PER_WEIGHT:
            raise ValueError(f"hybrimoe settings: cpu_format {self.cpu_format!r} is not one of "
                             f"{', '.join(BITS_PER_WEIGHT)}")
        if int(self.max_decode_rows) != self.max_decode_rows or self.max_decode_rows < 1:
            raise ValueError(f"hybrimoe settings: max_decode_rows must be an integer >= 1, got "
                             f"{self.max_decode_rows!r}")
        self.spec()  # an unknown or unsuitable strategy fails here, before the model loads

    def spec(self) -> StrategySpec:
        """The strategy as the plugin runs it: its decode must only look residency up (the step
        cadence); prefills split per layer with demand loads but never stream (the host's layer has no
        staging slots)."""
        spec = get_strategy(self.strategy)
        if spec.clairvoyant or spec.cadence != "step" or not spec.uses_gpu_cache:
            raise ValueError(f"hybrimoe settings: strategy {self.strategy!r} cannot run inside sglang-kt: "
                             f"the plugin needs a strategy that updates the GPU experts between decode steps "
                             f"(hybrimoe); kt's own placements are sglang-kt's --kt-expert-placement-strategy")
        return with_overrides(spec, prefill_stream=False, stream_buffer=0) if spec.prefill_stream else spec


def load_settings(environ: Optional[Mapping[str, str]] = None) -> PluginSettings:
    """Settings from ``environ`` (default ``os.environ``): the config file first, then the variables."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = env.get(CONFIG_ENV)
    if path:
        values.update(_read_config(Path(path)))
    for key, var in ENV.items():
        if env.get(var):
            values[key] = env[var]
    if env.get(DISABLE_ENV, "").strip() not in ("", "0"):
        values["enabled"] = False
    if "max_decode_rows" in values:
        try:
            values["max_decode_rows"] = int(values["max_decode_rows"])
        except (TypeError, ValueError):
            raise ValueError(f"hybrimoe settings: max_decode_rows must be an integer, got "
                             f"{values['max_decode_rows']!r}") from None
    if "enabled" in values and not isinstance(values["enabled"], bool):
        raise ValueError(f"hybrimoe settings: enabled must be true or false, got {values['enabled']!r}")
    return replace(PluginSettings(), **values)


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{CONFIG_ENV}={path}: no such file")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # a parse error of either format, reported in one line
        raise ValueError(f"{CONFIG_ENV}={path}: cannot parse it ({type(e).__name__}: {e})".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ValueError(f"{CONFIG_ENV}={path}: must hold a mapping of {', '.join(KEYS)}")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ValueError(f"{CONFIG_ENV}={path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(KEYS)}")
    return dict(data)
