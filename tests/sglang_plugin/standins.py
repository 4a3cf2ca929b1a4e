"""Minimal stand-ins for the parts of sglang-kt the plugin touches, written for these tests.

They follow the behaviour of the real ones as read in the host's source (see ``hybrimoe_kt/sglang/host.py``):
a wrapper registry that chain-wraps by priority and registers an id once; a ``KTEPWrapperMethod`` whose
``apply`` is a real hybrid MoE (the GPU part reads the layer's slot weights through
``gpu_experts_mask_cuda`` / ``logical_to_gpu_index_cuda``, the CPU part the full host weights for every
expert whose byte in the kt-kernel wrapper's ``gpu_experts_mask`` is not set), so any inconsistency
between masks, tables and slot contents shows up in the output; a ``FusedMoE`` layer that wraps its
method through the registry; a ``ModelRunner`` whose ``forward`` runs the layers; and a TP state.
Everything runs on the CPU.
"""

from __future__ import annotations

import ctypes
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional

import torch

# --- sglang.srt.layers.moe.quant_method_registry ----------------------------------------------------------


def make_registry() -> types.ModuleType:
    mod = types.ModuleType("sglang.srt.layers.moe.quant_method_registry")
    mod._QUANT_WRAPPERS = []

    def register_moe_quant_wrapper(wrapper_id: str, predicate: Callable, factory: Callable,
                                   priority: int = 100) -> None:
        if any(w[1] == wrapper_id for w in mod._QUANT_WRAPPERS):
            return
        mod._QUANT_WRAPPERS.append((priority, wrapper_id, predicate, factory))

    def maybe_wrap_moe_quant_method(layer: Any, gpu_method: Any, server_args: Any) -> Any:
        method = gpu_method
        for _p, wrapper_id, predicate, factory in sorted(mod._QUANT_WRAPPERS, key=lambda w: (w[0], w[1])):
            ctx = predicate(layer, server_args)
            if ctx is not None:
                method = factory(layer, method, ctx)
                if getattr(method, "_quant_wrapper_id", None) is None:
                    method._quant_wrapper_id = wrapper_id
        return method

    def is_wrapped_method(method: Any, wrapper_id: str) -> bool:
        return getattr(method, "_quant_wrapper_id", None) == wrapper_id

    mod.register_moe_quant_wrapper = register_moe_quant_wrapper
    mod.maybe_wrap_moe_quant_method = maybe_wrap_moe_quant_method
    mod.is_wrapped_method = is_wrapped_method
    return mod


# --- the model's experts -------------------------------------------------------------------------------

@dataclass
class Experts:
    """Full expert weights of every layer: gate/up [E, I, H], down [E, H, I] (bf16)."""

    gate: list[torch.Tensor]
    up: list[torch.Tensor]
    down: list[torch.Tensor]

    @staticmethod
    def random(n_layers: int, n_experts: int, hidden: int, inter: int, seed: int = 0) -> "Experts":
        g = torch.Generator().manual_seed(seed)

        def w(*shape: int) -> torch.Tensor:
            return (torch.randn(*shape, generator=g) * shape[-1] ** -0.5).to(torch.bfloat16)

        return Experts([w(n_experts, inter, hidden) for _ in range(n_layers)],
                       [w(n_experts, inter, hidden) for _ in range(n_layers)],
                       [w(n_experts, hidden, inter) for _ in range(n_layers)])

    def part(self, layer: int, e: int, rank: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """TP rank ``rank``'s partition: w13 [2I/tp, H] (gate rows then up rows), w2 [H, I/tp]."""
        inter = self.gate[layer].shape[1]
        p = inter // size
        rows = slice(rank * p, (rank + 1) * p)
        w13 = torch.cat([self.gate[layer][e, rows], self.up[layer][e, rows]])
        return w13.contiguous(), self.down[layer][e][:, rows].contiguous()


def expert_out(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert on rows ``x`` [N, H] from its (partition's) w13 [2I', H] and w2 [H, I'], fp32."""
    gate, up = w13.float().chunk(2)
    h = torch.nn.functional.silu(x.float() @ gate.T) * (x.float() @ up.T)
    return h @ w2.float().T


def reference(ex: Experts, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape[0], x.shape[1])
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            w13, w2 = ex.part(layer, e, 0, 1)
            out[t] += float(w[t, k]) * expert_out(x[t:t + 1], w13, w2)[0]
    return out


# --- kt-kernel's KTMoEWrapper and sglang-kt's KTEPWrapperMethod ---------------------------------------------

class FakeKtKernel:
    """kt-kernel's wrapper on TP rank 0: the CPU kernel's mask, its weight writer, its CPU experts."""

    def __init__(self, ex: Experts, layer: int, mask: torch.Tensor) -> None:
        self.ex, self.layer = ex, layer
        self.gpu_experts_mask = torch.empty_like(mask)
        self.gpu_experts_mask.copy_(mask)
        self.writes: list[int] = []

    def submit_write_weight_scale_to_buffer(self, tp: int, expert: int, w13_ptrs: list[int],
                                            w13_scale_ptrs: list[int], w2_ptrs: list[int],
                                            w2_scale_ptrs: list[int]) -> None:
        assert len(w13_ptrs) == len(w2_ptrs) == tp and all(p == 0 for p in w13_scale_ptrs + w2_scale_ptrs)
        for r in range(tp):
            for t, ptr in zip(self.ex.part(self.layer, expert, r, tp), (w13_ptrs[r], w2_ptrs[r])):
                ctypes.memmove(ptr, t.data_ptr(), t.numel() * t.element_size())
        self.writes.append(expert)

    def sync_write_weight_scale_to_buffer(self) -> None:
        pass

    def cpu_experts(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], x.shape[1])
        for t in range(x.shape[0]):
            for k in range(ids.shape[1]):
                e = int(ids[t, k])
                if e < 0 or bool(self.gpu_experts_mask[e]):
                    continue  # skipped: the GPU computes it
                w13, w2 = self.ex.part(self.layer, e, 0, 1)
                out[t] += float(w[t, k]) * expert_out(x[t:t + 1], w13, w2)[0]
        return out


@dataclass
class KTConfig:
    layer_idx: int
    gpu_experts_mask: torch.Tensor
    kt_enable_dynamic_expert_update: bool = False
    gpu_prefill_token_threshold: Optional[int] = None


class TopKOutput(NamedTuple):
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    router_logits: Optional[torch.Tensor]


class DispatchOutput(NamedTuple):
    hidden_states: torch.Tensor
    topk_output: TopKOutput


class GpuMethod:
    """The base GPU method (its weights are created by the kt wrapper's create_weights here)."""

    name = "unquantized"


def make_kt_wrapper_module(registry: types.ModuleType, host: "Host") -> types.ModuleType:
    mod = types.ModuleType("sglang.srt.layers.moe.kt_ep_wrapper")

    class KTEPWrapperMethod:
        _quant_wrapper_id = "kt_ep"

        def __init__(self, gpu_method: Any, kt_config: KTConfig) -> None:
            self.gpu_method, self.kt_config = gpu_method, kt_config
            self.gpu_experts_mask = kt_config.gpu_experts_mask
            self.num_gpu_experts = int(self.gpu_experts_mask.sum())
            on = torch.where(self.gpu_experts_mask)[0]
            self.logical_to_gpu_index = torch.full((len(self.gpu_experts_mask),), -1, dtype=torch.int32)
            self.logical_to_gpu_index[on] = torch.arange(len(on), dtype=torch.int32)
            self.gpu_index_to_logical = on.to(torch.int32)
            self.gpu_experts_mask_cuda = None
            self.logical_to_gpu_index_cuda = None
            self.gpu_prefill_token_threshold = kt_config.gpu_prefill_token_threshold or 0
            self.tp_rank = host.rank
            self.wrapper: Optional[FakeKtKernel] = None
            self.calls = 0

        def create_weights(self, layer: Any, num_experts: int, hidden_size: int,
                           intermediate_size_per_partition: int, params_dtype: torch.dtype, **_: Any) -> None:
            self.global_num_experts = num_experts
            s, i = self.num_gpu_experts, intermediate_size_per_partition
            layer.w13_weight = torch.nn.Parameter(torch.zeros(s, 2 * i, hidden_size, dtype=params_dtype),
                                                  requires_grad=False)
            layer.w2_weight = torch.nn.Parameter(torch.zeros(s, hidden_size, i, dtype=params_dtype),
                                                 requires_grad=False)
            self.gpu_experts_mask_cuda = self.gpu_experts_mask.clone()  # "on the device"
            self.logical_to_gpu_index_cuda = self.logical_to_gpu_index.clone()
            if self.tp_rank == 0:
                self.wrapper = FakeKtKernel(host.experts, self.kt_config.layer_idx, self.gpu_experts_mask)

        def process_weights_after_loading(self, layer: Any) -> None:
            for e in torch.where(self.gpu_experts_mask)[0].tolist():  # the checkpoint's GPU experts
                w13, w2 = host.experts.part(self.kt_config.layer_idx, e, host.rank, host.size)
                s = int(self.logical_to_gpu_index[e])
                layer.w13_weight.data[s].copy_(w13)
                layer.w2_weight.data[s].copy_(w2)

        def create_moe_runner(self, layer: Any, config: Any) -> None:
            self.moe_runner_config = config

        def apply(self, layer: Any, dispatch_output: DispatchOutput) -> torch.Tensor:
            self.calls += 1
            x = dispatch_output.hidden_states
            ids, w = dispatch_output.topk_output.topk_ids, dispatch_output.topk_output.topk_weights
            out = torch.zeros(x.shape[0], x.shape[1])
            if self.gpu_prefill_token_threshold and x.shape[0] >= self.gpu_prefill_token_threshold:
                for t in range(x.shape[0]):  # full-GPU fallback: every expert from the checkpoint
                    for k in range(ids.shape[1]):
                        w13, w2 = host.experts.part(self.kt_config.layer_idx, int(ids[t, k]), host.rank, host.size)
                        out[t] += float(w[t, k]) * expert_out(x[t:t + 1], w13, w2)[0]
                return out
            on_gpu = self.gpu_experts_mask_cuda[ids]           # mask_and_remap_expert_ids
            slots = torch.where(on_gpu, self.logical_to_gpu_index_cuda[ids], -1)
            for t in range(x.shape[0]):
                for k in range(ids.shape[1]):
                    s = int(slots[t, k])
                    if s >= 0:
                        out[t] += float(w[t, k]) * expert_out(x[t:t + 1], layer.w13_weight[s], layer.w2_weight[s])[0]
            if self.wrapper is not None:
                out += self.wrapper.cpu_experts(x, ids, w)
            return out

        def _update_gpu_experts_from_batch(self, layer: Any, ctx: Any, dispatch_output: Any) -> None:
            raise AssertionError("the plugin refuses kt's dynamic update")

        def __getattr__(self, name: str) -> Any:
            if name in ("gpu_method", "wrapper", "kt_config"):
                raise AttributeError(name)
            return getattr(self.gpu_method, name)

    def predicate(layer: Any, server_args: Any) -> Optional[KTConfig]:
        if getattr(server_args, "kt_weight_path", None) is None or host.kt_disabled:
            return None
        mask = host.masks[layer.layer_id]
        return KTConfig(layer.layer_id, mask, server_args.kt_enable_dynamic_expert_update,
                        server_args.kt_gpu_prefill_token_threshold)

    def factory(layer: Any, gpu_method: Any, kt_config: KTConfig) -> Any:
        return KTEPWrapperMethod(gpu_method, kt_config)

    mod.KTEPWrapperMethod = KTEPWrapperMethod
    registry.register_moe_quant_wrapper("kt_ep", predicate, factory, priority=20)
    return mod


# --- FusedMoE, the model and its runner ----------------------------------------------------------------------

@dataclass
class ServerArgs:
    kt_weight_path: Optional[str] = "/weights"
    kt_enable_dynamic_expert_update: bool = False
    kt_gpu_prefill_token_threshold: Optional[int] = None


class FusedMoE(torch.nn.Module):
    def __init__(self, registry: types.ModuleType, layer_id: int, n_experts: int, top_k: int, hidden: int,
                 inter_per_rank: int, server_args: ServerArgs) -> None:
        super().__init__()
        self.layer_id, self.top_k, self.num_experts = layer_id, top_k, n_experts
        self.quant_method = registry.maybe_wrap_moe_quant_method(self, GpuMethod(), server_args)
        self.quant_method.create_weights(layer=self, num_experts=n_experts, hidden_size=hidden,
                                         intermediate_size_per_partition=inter_per_rank,
                                         params_dtype=torch.bfloat16)
        self.quant_method.create_moe_runner(self, object())

    def forward(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(layer=self, dispatch_output=DispatchOutput(x, TopKOutput(w, ids, None)))


class ForwardMode:
    def __init__(self, kind: str) -> None:
        self.kind = kind

    def is_decode(self) -> bool:
        return self.kind == "decode"

    def is_idle(self) -> bool:
        return self.kind == "idle"


@dataclass
class ForwardBatch:
    forward_mode: ForwardMode
    batch_size: int
    inputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per layer


class Model(torch.nn.Module):
    def __init__(self, layers: list[FusedMoE]) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, fb: ForwardBatch) -> list[torch.Tensor]:
        return [layer(*args) for layer, args in zip(self.layers, fb.inputs)]


def make_model_runner_module() -> types.ModuleType:
    mod = types.ModuleType("sglang.srt.model_executor.model_runner")

    class ModelRunner:
        def __init__(self, model: Model) -> None:
            self.model = model

        def forward(self, forward_batch: ForwardBatch, skip_attn_backend_init: bool = False) -> Any:
            return self.model(forward_batch)

    mod.ModelRunner = ModelRunner
    return mod


# --- the host: modules, TP state --------------------------------------------------------------------------

class Host:
    """The stand-in host of one TP rank: its modules, masks from kt's placement, the experts."""

    def __init__(self, experts: Experts, masks: torch.Tensor, rank: int = 0, size: int = 1) -> None:
        self.experts, self.masks, self.rank, self.size = experts, masks, rank, size
        self.kt_disabled = False
        self.registry = make_registry()
        self.kt = make_kt_wrapper_module(self.registry, self)
        self.runner_mod = make_model_runner_module()
        dist_mod = types.ModuleType("sglang.srt.distributed")
        dist_mod.get_tensor_model_parallel_rank = lambda: self.rank
        dist_mod.get_tensor_model_parallel_world_size = lambda: self.size
        dist_mod.get_tp_group = lambda: types.SimpleNamespace(cpu_group="cpu", device_group="device")
        self.dist_mod = dist_mod

    def modules(self) -> dict[str, types.ModuleType]:
        names = ["sglang", "sglang.srt", "sglang.srt.layers", "sglang.srt.layers.moe",
                 "sglang.srt.model_executor"]
        mods: dict[str, types.ModuleType] = {n: types.ModuleType(n) for n in names}
        for m in mods.values():
            m.__path__ = []  # packages
        mods["sglang.srt.layers.moe.quant_method_registry"] = self.registry
        mods["sglang.srt.layers.moe.kt_ep_wrapper"] = self.kt
        mods["sglang.srt.model_executor.model_runner"] = self.runner_mod
        mods["sglang.srt.distributed"] = self.dist_mod
        return mods

    def build(self, server_args: ServerArgs, top_k: int, hidden: int, inter: int) -> tuple[Model, Any]:
        n_layers, n_experts = self.masks.shape
        layers = [FusedMoE(self.registry, l, n_experts, top_k, hidden, inter // self.size, server_args)
                  for l in range(n_layers)]
        for layer in layers:
            inner = getattr(layer.quant_method, "inner", layer.quant_method)
            inner.process_weights_after_loading(layer)
        model = Model(layers)
        return model, self.runner_mod.ModelRunner(model)


class RecordingDist:
    """``torch.distributed`` for two in-process TP ranks run one after the other: rank 0 records what
    it broadcasts and scatters, rank 1 receives the same sequence."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []
        self.rank = 0
        self.pos = 0

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def broadcast(self, t: torch.Tensor, src: int = 0, group: Any = None) -> None:
        assert src == 0 and group == "cpu"
        if self.rank == 0:
            self.log.append(("broadcast", t.clone()))
        else:
            kind, value = self.log[self.pos]
            self.pos += 1
            assert kind == "broadcast" and value.shape == t.shape and value.dtype == t.dtype
            t.copy_(value)

    def scatter(self, out: torch.Tensor, scatter_list: Optional[list[torch.Tensor]] = None, src: int = 0,
                group: Any = None) -> None:
        assert src == 0 and group == "device"
        if self.rank == 0:
            assert scatter_list is not None
            self.log.append(("scatter", [p.clone() for p in scatter_list]))
            out.copy_(scatter_list[0])
        else:
            assert scatter_list is None
            kind, parts = self.log[self.pos]
            self.pos += 1
            assert kind == "scatter"
            out.copy_(parts[self.rank])


def install(monkeypatch: Any, host: Host) -> None:
    """Put ``host``'s modules in ``sys.modules`` and forget any imported ``hybrimoe_kt.sglang``."""
    for name, mod in host.modules().items():
        monkeypatch.setitem(sys.modules, name, mod)
    for name in [n for n in sys.modules if n == "hybrimoe_kt.sglang" or n.startswith("hybrimoe_kt.sglang.")]:
        monkeypatch.delitem(sys.modules, name)
