"""The classic experts operator's rule kwargs: its name, what it accepts, and their validation.

The operator takes this package's runtime kwargs (``strategy``, one GPU budget of ``cache_ratio`` /
``gpu_slots`` / ``gpu_gib``, ``prefetch_depth``, ``cpu_threads``, ``cpu_backend``,
``hardware_profile``, ``placement_counts``; see ``hybrimoe_kt.kt.operators``) next to the kwargs of
kTransformers' own experts operator, so a stock kT experts rule can be pointed at it unchanged:

- ``generate_device`` is the GPU tier (where resident experts run; ``cpu`` is the CPU stand-in used by
  tests). One runtime serves prefill and decode, so ``prefill_device`` must name the same device (kT's
  stock ``generate_device: cpu`` for its CPU kernel is refused with that explanation);
- ``out_device``: where ``forward`` returns its result (default: ``generate_device``);
- ``backend``: kT's CPU kernel choice; ``llamafile`` (the kernel family this package's GGUF CPU tier
  runs, kt-kernel's llamafile MoE) is accepted, kT's AMX backends are refused (they repack weights
  into a format this package's tiers do not read);
- ``prefill_op`` / ``generate_op`` name kT's own expert kernels; the operator runs its CPU and GPU
  tiers instead, so their values are accepted and not used.

``cpu_threads`` left out: kT's ``Config().cpu_infer`` (``--cpu_infer``), else this package's default.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Mapping

from hybrimoe_kt.kt.operators import HybriMoEExperts, RuntimeSettings, runtime_settings

log = logging.getLogger(__name__)

OPERATOR = "KHybriMoEExperts"
OPERATOR_PATH = f"hybrimoe_kt.kt.classic.{OPERATOR}"
KT_KWARGS = frozenset({"prefill_op", "generate_op", "out_device", "backend"})
KWARGS = HybriMoEExperts.KWARGS | KT_KWARGS
KT_BACKENDS = ("llamafile",)
DEFAULT_STRATEGY = "hybrimoe"

_LAYER = re.compile(r"(?:^|\.)(?:blk|layers)\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class ClassicSettings:
    runtime: RuntimeSettings  # shared by every operator of the model (one runtime)
    out_device: str
    layer: int                # the decoder layer, from the module key


def layer_of(key: str) -> int:
    """The decoder layer of a kT module key: ``model.layers.<i>....`` or the GGUF form ``blk.<i>``."""
    m = _LAYER.search(key)
    if m is None:
        raise ValueError(f"{key}: cannot tell the decoder layer from the module key; the rule must match "
                         f"the experts module of a decoder layer (model.layers.<i>...experts)")
    return int(m.group(1))


def classic_settings(key: str, kwargs: Mapping[str, Any], prefill_device: str, generate_device: str,
                     cpu_infer: int | None = None) -> ClassicSettings:
    """Validate one operator's kwargs (ValueError naming the key and the fix). ``cpu_infer``: kT's
    thread setting, used when the rule gives no ``cpu_threads``."""
    unknown = sorted(set(kwargs) - KWARGS)
    if unknown:
        raise ValueError(f"{key}: unknown kwargs {unknown} for {OPERATOR}; accepted: {sorted(KWARGS)}")
    layer = layer_of(key)
    if str(prefill_device) != str(generate_device):
        raise ValueError(f"{key}: prefill_device {prefill_device!r} and generate_device {generate_device!r} "
                         f"differ; {OPERATOR} serves both phases from one runtime whose GPU tier is "
                         f"generate_device (routed experts run on the CPU tier regardless): give both "
                         f"the GPU, e.g. 'cuda' ('cpu' is the CPU stand-in for tests)")
    backend = kwargs.get("backend")
    if backend is not None and backend not in KT_BACKENDS:
        raise ValueError(f"{key}: backend {backend!r} is not supported by {OPERATOR} (its CPU tier runs the "
                         f"GGUF blocks on kt-kernel's llamafile MoE); use backend: llamafile or leave it out")
    for name in ("prefill_op", "generate_op"):
        if kwargs.get(name) is not None:
            log.debug("%s: %s=%r names a kTransformers expert kernel; %s runs its own CPU and GPU tiers",
                      key, name, kwargs[name], OPERATOR)
    ours = dict(kwargs)
    if ours.get("cpu_threads") is None and cpu_infer is not None:
        ours["cpu_threads"] = int(cpu_infer)
    threads = ours.get("cpu_threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"{key}: cpu_threads must be a positive integer, got {threads!r}")
    settings = runtime_settings(key, ours, DEFAULT_STRATEGY, str(generate_device))
    out = kwargs.get("out_device")
    return ClassicSettings(settings, str(generate_device if out is None else out), layer)
