"""The HybriMoE operators, one class each for every model family: ``HybriMoEBlock`` replaces a whole
MoE block (what the shipped rule files use); ``HybriMoEExperts`` replaces only the block's experts
module.

In transformers 5.x every supported family's MoE block calls ``self.experts(x [N, H], top_k_index
[N, k], top_k_weights [N, k]) -> [N, H]`` after its own router - kTransformers' experts-operator
contract. The operator replaces that ``experts`` module, so the family's router (softmax or sigmoid,
grouped top-k, renormalisation, scaling) and its shared expert keep running unchanged on the GPU tier,
and the routed experts go to the hybrid runtime. There is no per-family operator class.

All operators of a model share one runtime (one expert cache across layers): after the rules are
applied, ``attach_runtime(model)`` (``runtime_attach.py``) gathers their weights into one host store
and builds it. Rule kwargs (see ``optimize_rules/*.yaml``):

- ``strategy``: a strategy name (``stock``, ``static-frequency``, ``lru-offload``, ``hybrimoe-paper``,
  ``hybrimoe``); the stock and static operators below only change the default;
- GPU expert budget, at most one of ``cache_ratio`` (fraction of routed experts), ``gpu_slots`` (slots
  in all) or ``gpu_gib`` (GiB of bf16 expert weights); default ``cache_ratio: 0.25``;
- ``prefetch_depth`` (layers ahead), ``prefetch`` (replaces the strategy's prefetcher; ``hidden``: the
  next MoE block's router run on this layer's hidden state, per-layer strategies only, ``kt.hidden_hook``),
  ``cpu_threads``, ``cpu_backend`` (auto / kt-kernel / torch),
  ``hardware_profile`` (preset name or calibrated JSON: the cost model the decisions use),
  ``placement_counts`` (a routing trace or a ``.npy`` [L, E] of activation counts for the initial and
  static placement; never the requests being served): required by ``static-frequency`` (the runtime
  refuses to build without it); without it a cache strategy starts with an empty GPU cache.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from hybrimoe_kt.kt.families import stacked_expert_weights

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class RuntimeSettings:
    """What every operator of one model must agree on (they share one runtime)."""

    strategy: str
    cache_ratio: Optional[float]
    gpu_slots: Optional[int]
    gpu_gib: Optional[float]
    prefetch_depth: Optional[int]
    cpu_threads: Optional[int]
    cpu_backend: str
    hardware_profile: str
    placement_counts: Optional[str]
    device: str
    prefetch: Optional[str] = None  # overrides the strategy's prefetcher ('hidden': kt.hidden_hook)


def runtime_settings(key: str, kwargs: Mapping[str, Any], default_strategy: str, device: str) -> RuntimeSettings:
    """The runtime settings a rule's kwargs give (names as in ``HybriMoEExperts.KWARGS``; others are
    ignored here, the caller checks them): at most one GPU budget, ``cache_ratio: 0.25`` when none."""
    budget = [k for k in ("cache_ratio", "gpu_slots", "gpu_gib") if kwargs.get(k) is not None]
    if len(budget) > 1:
        raise ValueError(f"{key}: give at most one GPU expert budget, got {budget}")
    ratio = kwargs.get("cache_ratio")
    if not budget:
        ratio = 0.25
    if ratio is not None and not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"{key}: cache_ratio must be in [0, 1], got {ratio}")
    return RuntimeSettings(
        strategy=str(kwargs.get("strategy", default_strategy)),
        cache_ratio=None if ratio is None else float(ratio),
        gpu_slots=kwargs.get("gpu_slots"), gpu_gib=kwargs.get("gpu_gib"),
        prefetch_depth=kwargs.get("prefetch_depth"), cpu_threads=kwargs.get("cpu_threads"),
        cpu_backend=str(kwargs.get("cpu_backend", "auto")),
        hardware_profile=str(kwargs.get("hardware_profile", "rtx4090-ddr5")),
        placement_counts=kwargs.get("placement_counts"), device=device, prefetch=kwargs.get("prefetch"))


class HybriMoEExperts(torch.nn.Module):
    KWARGS = frozenset({"strategy", "cache_ratio", "gpu_slots", "gpu_gib", "prefetch_depth", "cpu_threads",
                        "cpu_backend", "hardware_profile", "placement_counts", "prefetch"})
    DEFAULT_STRATEGY = "hybrimoe"

    def __init__(self, key: str, gguf_loader: Any, config: Any, orig_module: torch.nn.Module,
                 prefill_device: str = "cpu", generate_device: str = "cpu", **kwargs: Any) -> None:
        super().__init__()
        unknown = sorted(set(kwargs) - self.KWARGS)
        if unknown:
            raise ValueError(f"{key}: unknown kwargs {unknown}; accepted: {sorted(self.KWARGS)}")
        m = _LAYER.search(key)
        if m is None:
            raise ValueError(f"{key}: cannot tell the decoder layer from the module name; the rule must "
                             f"match a module under 'layers.<i>.'")
        self.key = key
        self.layer_index = int(m.group(1))
        self.settings = runtime_settings(key, kwargs, self.DEFAULT_STRATEGY, str(generate_device))
        self.weights: Optional[tuple[torch.Tensor, ...]] = stacked_expert_weights(orig_module)
        self.n_experts = int(self.weights[0].shape[0])
        self.runtime: Any = None   # the shared HybridMoE, set by attach_runtime
        self.moe_index = -1        # this layer's index among the model's MoE layers

    def load(self) -> None:
        """Weights were taken from the original module at construction; nothing to read."""

    def unload(self) -> None:
        self.runtime = None

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.runtime is None:
            raise RuntimeError(f"{self.key}: no runtime attached; call attach_runtime(model) after "
                               f"applying the rules")
        return self.runtime.forward(self.moe_index, hidden, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        s = self.settings
        return f"layer={self.layer_index}, strategy={s.strategy}, device={s.device}"


class StockExperts(HybriMoEExperts):
    """kTransformers' default: every routed expert on the CPU kernel."""

    DEFAULT_STRATEGY = "stock"


class StaticExperts(HybriMoEExperts):
    """A fixed GPU expert set chosen by calibration frequency (kt-kernel's experts-sched)."""

    DEFAULT_STRATEGY = "static-frequency"


class HybriMoEBlock(HybriMoEExperts):
    """Replaces a family's whole MoE block (``model.layers.<i>.mlp``), the kTransformers MoE-block
    operator: the family's router runs through the routing adapter of ``families.py`` (softmax or
    sigmoid, grouped top-k, renormalisation, scaling), the routed experts through the shared runtime,
    and the shared expert (with its sigmoid gate where the family has one) runs on the GPU tier between
    the CPU experts' submit and sync, overlapping them. Same kwargs as ``HybriMoEExperts``."""

    def __init__(self, key: str, gguf_loader: Any, config: Any, orig_module: torch.nn.Module,
                 prefill_device: str = "cpu", generate_device: str = "cpu", **kwargs: Any) -> None:
        from hybrimoe_kt.kt.families import block_spec

        spec = block_spec(orig_module)
        super().__init__(key, gguf_loader, config, getattr(orig_module, spec.experts_attr),
                         prefill_device, generate_device, **kwargs)
        self.family = spec
        self.gate = getattr(orig_module, spec.router_attr)  # the attribute name route() reads
        self.shared_expert = getattr(orig_module, spec.shared_attr) if spec.shared_attr else None
        self.shared_expert_gate = getattr(orig_module, spec.shared_gate_attr) if spec.shared_gate_attr else None

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        assert self.shared_expert is not None
        out = self.shared_expert(x)
        if self.shared_expert_gate is not None:
            out = torch.sigmoid(self.shared_expert_gate(x)) * out
        return out

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        from hybrimoe_kt.kt.families import route

        if self.runtime is None:
            raise RuntimeError(f"{self.key}: no runtime attached; call attach_runtime(model) after "
                               f"applying the rules")
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])                                  # [N, H]
        ids, weights = route(self, x, self.family)                         # [N, k], [N, k]
        shared = self._shared if self.shared_expert is not None else None
        out = self.runtime.forward(self.moe_index, x, ids, weights, shared=shared)
        return out.reshape(shape)


class StockBlock(HybriMoEBlock):
    """kTransformers' default rules as a block operator: every routed expert on the CPU kernel."""

    DEFAULT_STRATEGY = "stock"


class StaticBlock(HybriMoEBlock):
    """A fixed GPU expert set chosen by calibration frequency, as a block operator."""

    DEFAULT_STRATEGY = "static-frequency"
