"""Benchmark harness: a stack of model-shaped MoE layers with random weights, driven by replayed routing.

Shared by ``scripts/bench_runtime.py`` and ``scripts/device_check.py``. ``StackShape`` names the layer
shape; ``random_store`` fills a host store quickly (on the GPU when one is given); ``run_replay`` runs a
HybridMoE over replay steps and records, per forward, the wall time of all layers (synchronised around
the timed region only) and per layer call the host time the runtime spent deciding and dispatching, its
background host time, the call's wall time and the whole layer's (with ``dense``: the attention-like
part and the shared experts of ``runtime.dense_parts`` run in every layer too).
``trivial_kernels`` replaces every kernel and copy by a no-op so that only host work remains (a
measuring tool, never used for results that claim compute).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from hybrimoe_kt.core.models import ModelPreset, get_model
from hybrimoe_kt.runtime import layer_plan as plan_module
from hybrimoe_kt.runtime import moe as moe_module
from hybrimoe_kt.runtime.dense_parts import DenseParts
from hybrimoe_kt.runtime.moe import HybridMoE
from hybrimoe_kt.runtime.replay import ReplayStep, RoutingReplay
from hybrimoe_kt.runtime.store import HostExpertStore


@dataclass(frozen=True, slots=True)
class StackShape:
    """MoE layers of one model family (expert count and top-k from the model, optionally smaller FFNs)."""

    model: str
    n_layers: int
    hidden: int
    inter: int
    shared_inter: Optional[int] = None  # shared experts' total width in the stack (None: the model's)
    attn_params: Optional[int] = None   # attention-like weights per layer in the stack (None: the model's)

    def preset(self) -> ModelPreset:
        base = get_model(self.model)
        kw: dict[str, Any] = {"hidden": self.hidden, "expert_intermediate": self.inter}
        if self.shared_inter is not None:
            kw["shared_intermediate"] = self.shared_inter
            kw["n_shared_experts"] = base.n_shared_experts if self.shared_inter else 0
        if self.attn_params is not None:
            kw["attn_params"] = self.attn_params
        return replace(base, **kw)

    @property
    def n_experts(self) -> int:
        return get_model(self.model).n_experts

    @property
    def top_k(self) -> int:
        return get_model(self.model).top_k

    def expert_bytes(self) -> int:
        return 3 * self.hidden * self.inter * 2  # bf16

    def describe(self) -> dict[str, Any]:
        return {"model_shape": self.model, "n_layers": self.n_layers, "n_experts": self.n_experts,
                "top_k": self.top_k, "hidden": self.hidden, "expert_intermediate": self.inter,
                "shared_intermediate": self.shared_inter, "attn_params": self.attn_params,
                "expert_mib_bf16": round(self.expert_bytes() / 2**20, 3),
                "weights_gib_bf16": round(self.n_layers * self.n_experts * self.expert_bytes() / 2**30, 3)}


def random_store(shape: StackShape, seed: int = 0, pin: bool = False,
                 device: Optional[torch.device] = None) -> HostExpertStore:
    """Random bf16 experts (std ~ fan_in^-1/2). With ``device`` (a GPU) each tensor is drawn there and
    copied back; on the CPU one random expert-sized block per tensor is drawn and repeated with a
    per-expert sign and scale, which keeps the fill fast (weight values do not change timings)."""
    store = HostExpertStore.allocate(shape.n_layers, shape.n_experts, shape.hidden, shape.inter, pin)
    gen = torch.Generator(device=device if device is not None else "cpu").manual_seed(seed)
    for lw in store.layers:
        for t, fan_in in ((lw.gate, shape.hidden), (lw.up, shape.hidden), (lw.down, shape.inter)):
            e = t.shape[0]
            if device is not None:
                for i in range(e):
                    t[i].copy_((torch.randn(t.shape[1:], generator=gen, device=device)
                                * fan_in ** -0.5).to(torch.bfloat16))
                continue
            block = torch.randn(t.shape[1:], generator=gen) * fan_in ** -0.5
            scales = 0.5 + torch.rand(e, generator=gen)
            signs = torch.where(torch.rand(e, generator=gen) < 0.5, -1.0, 1.0)
            for i in range(e):
                t[i].copy_(block * float(scales[i] * signs[i]))
    return store


@dataclass
class RunRecord:
    """What one replayed run measured."""

    forward_s: list[float] = field(default_factory=list)      # wall time of each timed forward, all layers
    forward_tokens: list[int] = field(default_factory=list)
    forward_prefill: list[bool] = field(default_factory=list)
    layer_host_s: list[float] = field(default_factory=list)   # decide + dispatch of each layer call
    layer_decide_s: list[float] = field(default_factory=list)
    layer_background_s: list[float] = field(default_factory=list)  # background host time of each call
    layer_call_s: list[float] = field(default_factory=list)   # wall time of each HybridMoE.forward call
    layer_s: list[float] = field(default_factory=list)        # whole layer: non-MoE part + the call
    layer_prefill: list[bool] = field(default_factory=list)
    forward_upkeep_s: list[float] = field(default_factory=list)  # begin_forward of each step (its upkeep)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_replay(moe: HybridMoE, replay: RoutingReplay, steps: Sequence[ReplayStep], *, seed: int = 0,
               record: Optional[RunRecord] = None, timed: bool = True,
               layer_wall: Optional[list[float]] = None,
               dense: Optional[DenseParts | NoOpDense] = None) -> RunRecord:
    """Run ``steps`` through every layer of ``moe``; inputs and routing are placed on the tier's device
    before the timed region (a router's outputs live there). ``layer_wall`` collects the wall time of
    each layer call (no synchronisation: on a GPU that is the host's share). ``dense``: each layer runs
    its attention-like part before the call and its shared experts inside it (on the tier's device);
    ``moe.begin_forward(is_prefill)`` marks the first layer's start (and runs a step-cadence upkeep), so
    its time given to the controller includes that part, as every later layer's does."""
    rec = record if record is not None else RunRecord()
    dev = moe.tier.device
    gen = torch.Generator().manual_seed(seed)
    n_layers = moe.store.n_layers
    st = moe.stats
    for step in steps:
        n = step.n_tokens
        xs = (torch.randn(n, moe.store.hidden, generator=gen) * 0.5).to(torch.bfloat16).to(dev)
        routes = [tuple(t.to(dev) for t in replay.routing(step, layer)) for layer in range(n_layers)]
        _sync(dev)
        t0 = time.perf_counter()
        x = xs
        with torch.no_grad():
            for layer in range(n_layers):
                d0, p0, b0 = st.decide_s, st.dispatch_s, st.background_s
                ta = time.perf_counter()
                if layer == 0:  # a step-cadence strategy runs its upkeep here
                    moe.begin_forward(is_prefill=step.is_prefill)
                    rec.forward_upkeep_s.append(time.perf_counter() - ta)
                shared = None
                if dense is not None:
                    x = dense.attention(layer, x)
                    shared = dense.shared(layer)
                tl = time.perf_counter()
                y = moe.forward(layer, x, routes[layer][0], routes[layer][1], shared=shared)
                te = time.perf_counter()
                if layer_wall is not None:
                    layer_wall.append(te - tl)
                rec.layer_call_s.append(te - tl)
                rec.layer_s.append(te - ta)
                rec.layer_host_s.append((st.decide_s - d0) + (st.dispatch_s - p0))
                rec.layer_decide_s.append(st.decide_s - d0)
                rec.layer_background_s.append(st.background_s - b0)
                rec.layer_prefill.append(step.is_prefill)
                x = (x.float() + y.float()).to(torch.bfloat16)  # residual keeps the input scale
        _sync(dev)
        if timed:
            rec.forward_s.append(time.perf_counter() - t0)
            rec.forward_tokens.append(n)
            rec.forward_prefill.append(step.is_prefill)
    return rec


def summary_us(xs: Sequence[float]) -> dict[str, float]:
    """median / p90 / mean in microseconds (empty input: zeros and n=0)."""
    if not xs:
        return {"median_us": 0.0, "p90_us": 0.0, "mean_us": 0.0, "n": 0}
    a = np.asarray(xs, dtype=np.float64) * 1e6
    return {"median_us": round(float(np.median(a)), 2), "p90_us": round(float(np.percentile(a, 90)), 2),
            "mean_us": round(float(a.mean()), 2), "n": int(a.size)}


class NoOpDense:
    """The dense parts of a layer as no-op kernels, for host-time measurements: the attention returns its
    input, and the shared experts (a model with them, e.g. DeepSeek-V2-Lite's two) return a preallocated
    zero block, so a layer call pays the shared-expert plumbing (the call, the sum) and no compute."""

    def __init__(self, hidden: int, max_rows: int = 1024, dtype: torch.dtype = torch.bfloat16) -> None:
        self._zeros = torch.zeros(max_rows, hidden, dtype=dtype)

    def attention(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def shared(self, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: self._zeros[: x.shape[0]]


@contextmanager
def trivial_kernels(moe: HybridMoE) -> Iterator[None]:
    """Within the block, CPU expert calls, GPU expert calls and slot copies of ``moe`` do nothing; every
    host step of the runtime (decisions, masks, slot bookkeeping, events, tensor plumbing) still runs."""
    def gpu_noop(x: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor, slots: Any,
                 active_slots: Any = None, out: Optional[torch.Tensor] = None, **_: Any) -> torch.Tensor:
        return out if out is not None else torch.zeros(x.shape[0], slots.hidden, device=x.device)

    saved_gpu, saved_triton = moe_module.gpu_experts_forward, moe._triton
    moe._triton = None  # the CUDA decode path's Triton kernel: a no-op too (through gpu_noop)
    saved = [(b, b.__dict__.get("submit"), b.__dict__.get("sync")) for b in moe.cpu]
    weights = moe.pool.weights
    write_name = "write_blocks" if weights.fmt == "gguf" else "write_packed"  # the slot copy
    saved_write = weights.__dict__.get(write_name)
    moe_module.gpu_experts_forward = gpu_noop  # type: ignore[assignment]  # the decode lookup path
    plan_module.gpu_experts_forward = gpu_noop  # type: ignore[assignment]  # the per-layer plan path
    for b in moe.cpu:
        b.submit = lambda *a, **k: None  # type: ignore[method-assign]
        b.sync = lambda: None  # type: ignore[method-assign]
    setattr(weights, write_name, lambda *a, **k: None)
    try:
        yield
    finally:
        moe_module.gpu_experts_forward = saved_gpu  # type: ignore[assignment]
        plan_module.gpu_experts_forward = saved_gpu  # type: ignore[assignment]
        moe._triton = saved_triton
        for b, sub, syn in saved:
            for name, orig in (("submit", sub), ("sync", syn)):
                if orig is None:
                    delattr(b, name)
                else:
                    setattr(b, name, orig)
        if saved_write is None:
            delattr(weights, write_name)
        else:
            setattr(weights, write_name, saved_write)
