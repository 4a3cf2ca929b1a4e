"""Every name the plugin takes from sglang-kt and kt-kernel, in one module.

The rest of ``hybrimoe_kt.sglang`` reaches the host only through these functions. They were written
from the source of the kvcache-ai SGLang fork (github.com/kvcache-ai/sglang at 04653fa, July 2026:
``python/sglang/srt/layers/moe/quant_method_registry.py``, ``kt_ep_wrapper.py``,
``model_executor/model_runner.py``) and kt-kernel 0.7.2 (``experts_base.py``, ``utils/amx.py``), and
have only run against the stand-ins in ``tests/sglang_plugin``; a host release that renames one of them
needs this module changed, nothing else. What each one relies on:

- ``register_moe_quant_wrapper(wrapper_id, predicate, factory, priority)``: ``FusedMoE.__init__``
  chain-wraps its GPU method with every registered wrapper whose ``predicate(layer, server_args)``
  returns a context, lowest priority innermost (kt registers ``"kt_ep"`` at 20); a wrapper id is
  registered once. ``is_wrapped_method(m, "kt_ep")`` reads ``m._quant_wrapper_id``.
- ``KTEPWrapperMethod`` per MoE layer: ``gpu_experts_mask`` (bool [E], CPU), ``gpu_experts_mask_cuda``
  and ``logical_to_gpu_index_cuda`` (the device tables ``mask_and_remap_expert_ids`` reads inside
  captured decode graphs), ``logical_to_gpu_index`` (int32 [E], CPU), ``gpu_index_to_logical``
  (int32 [S]), ``num_gpu_experts`` (S, fixed at load), ``global_num_experts``, ``tp_rank``,
  ``kt_config`` (``layer_idx``, ``kt_enable_dynamic_expert_update``), ``gpu_prefill_token_threshold``,
  and on TP rank 0 ``wrapper``: kt-kernel's ``KTMoEWrapper``, whose pinned ``gpu_experts_mask`` the
  C++ kernel reads at every forward (experts whose byte is set are skipped) and whose
  ``submit_write_weight_scale_to_buffer(tp_count, expert, w13_ptrs, w13_scale_ptrs, w2_ptrs,
  w2_scale_ptrs)`` / ``sync_write_weight_scale_to_buffer()`` write one expert's GPU-format weights,
  one partition per TP rank, to host pointers (the path sglang-kt's full-layer prefill uses).
- The layer's GPU expert weights: BF16 ``w13_weight`` [S, 2I/tp, H] and ``w2_weight`` [S, H, I/tp],
  indexed by GPU slot (other GPU formats are repacked after loading and are not supported here).
- ``ModelRunner.forward(forward_batch, ...)``: runs in Python for every forward, also when the
  forward replays a CUDA graph; ``forward_batch.forward_mode.is_decode()/is_idle()`` and
  ``forward_batch.batch_size``.
- ``dispatch_output.hidden_states`` and ``dispatch_output.topk_output`` (``topk_weights, topk_ids, _``).
- ``sglang.srt.distributed``: ``get_tensor_model_parallel_rank/world_size`` and
  ``get_tp_group().cpu_group / .device_group``; ``torch.distributed`` when initialised.
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

log = logging.getLogger(__name__)

REGISTRY = "sglang.srt.layers.moe.quant_method_registry"
KT_WRAPPER = "sglang.srt.layers.moe.kt_ep_wrapper"
MODEL_RUNNER = "sglang.srt.model_executor.model_runner"
DISTRIBUTED = "sglang.srt.distributed"
KT_ID = "kt_ep"
KT_PRIORITY = 20
SLOT_WEIGHTS = ("w13_weight", "w2_weight")  # BF16 GPU experts
SLOT_DTYPES = (torch.bfloat16, torch.float16)


class UnsupportedHost(RuntimeError):
    """The host's state is not what this plugin was written against (one-line message)."""


def _module(name: str) -> Any:
    return importlib.import_module(name)


# --- registration --------------------------------------------------------------------------------

def register(wrapper_id: str, predicate: Callable, factory: Callable, priority: int) -> None:
    _module(REGISTRY).register_moe_quant_wrapper(wrapper_id, predicate, factory, priority=priority)


def is_kt_method(method: object) -> bool:
    return bool(_module(REGISTRY).is_wrapped_method(method, KT_ID))


def kt_configured(server_args: object) -> bool:
    """kt-kernel experts are on (sglang-kt wraps layers only with ``--kt-weight-path``)."""
    return getattr(server_args, "kt_weight_path", None) is not None


def dynamic_update(method: object) -> bool:
    return bool(getattr(getattr(method, "kt_config", None), "kt_enable_dynamic_expert_update", False))


def prefill_threshold(method: object) -> int:
    return int(getattr(method, "gpu_prefill_token_threshold", 0) or 0)


# --- one layer's state -------------------------------------------------------------------------------

@dataclass
class LayerState:
    """Views of one MoE layer's kt state; the plugin rewrites them in place, never rebinds them."""

    layer_id: int
    n_experts: int
    n_slots: int
    top_k: int
    mask_cpu: torch.Tensor           # bool [E]
    mask_dev: torch.Tensor           # bool [E] on the device
    lut_cpu: torch.Tensor            # int32 [E]: expert -> GPU slot, -1 on the CPU
    lut_dev: torch.Tensor            # int32 [E] on the device
    inverse: torch.Tensor            # int32 [S]: GPU slot -> expert
    kernel_mask: Optional[torch.Tensor]  # bool [E], pinned, read by the C++ kernel (TP rank 0)
    weights: dict[str, torch.Tensor]  # slot tensors [S, ...]
    writer: Any                      # kt-kernel's KTMoEWrapper on TP rank 0, else None
    hidden: int
    intermediate: int                # full (all TP ranks) expert FFN width


def layer_state(layer: Any, method: Any) -> LayerState:
    """Read one layer's state (after ``create_weights``: the device tables exist)."""
    try:
        mask_cpu, mask_dev = method.gpu_experts_mask, method.gpu_experts_mask_cuda
        lut_cpu, lut_dev = method.logical_to_gpu_index, method.logical_to_gpu_index_cuda
        inverse, n_slots = method.gpu_index_to_logical, int(method.num_gpu_experts)
        layer_id = int(method.kt_config.layer_idx)
    except AttributeError as e:
        raise UnsupportedHost(f"the kt_ep method of an MoE layer lacks {e.name!r}: this sglang-kt release "
                              f"differs from the one hybrimoe_kt.sglang supports") from None
    if mask_dev is None or lut_dev is None:
        raise UnsupportedHost(f"MoE layer {layer_id}: kt's device expert tables are not built yet "
                              f"(create_weights has not run)")
    weights: dict[str, torch.Tensor] = {}
    for name in SLOT_WEIGHTS:
        t = getattr(layer, name, None)
        if not isinstance(t, torch.Tensor) or t.dtype not in SLOT_DTYPES or t.shape[0] != n_slots:
            got = "missing" if t is None else f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
            raise UnsupportedHost(f"MoE layer {layer_id}: hybrimoe rewrites BF16 GPU experts ({name} "
                                  f"[{n_slots}, ...] in bf16/fp16), got {name} {got}: serve a BF16 "
                                  f"checkpoint (--kt-method BF16) or unset SGLANG_EXTERNAL_MODEL_PACKAGE")
        weights[name] = t.data if isinstance(t, torch.nn.Parameter) else t
    wrapper = getattr(method, "wrapper", None)
    kernel_mask = getattr(wrapper, "gpu_experts_mask", None) if wrapper is not None else None
    n_experts = int(getattr(method, "global_num_experts", len(mask_cpu)))
    hidden = int(weights["w13_weight"].shape[2])
    inter = int(weights["w2_weight"].shape[2]) * tp_size()
    return LayerState(layer_id, n_experts, n_slots, int(layer.top_k), mask_cpu, mask_dev, lut_cpu, lut_dev,
                      inverse, kernel_mask, weights, wrapper, hidden, inter)


def routing_of(dispatch_output: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden_states [N, H], topk_ids [N, K], topk_weights [N, K])`` of one MoE call."""
    topk = dispatch_output.topk_output
    return dispatch_output.hidden_states, topk.topk_ids, topk.topk_weights


# --- tensor parallelism ------------------------------------------------------------------------------

def _dist() -> Any:
    """``torch.distributed`` when it is initialised, else None (a single process)."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def tp_rank() -> int:
    return int(_module(DISTRIBUTED).get_tensor_model_parallel_rank()) if _dist() is not None else 0


def tp_size() -> int:
    return int(_module(DISTRIBUTED).get_tensor_model_parallel_world_size()) if _dist() is not None else 1


def broadcast(t: torch.Tensor) -> None:
    """Rank 0's ``t`` (a host tensor) into every TP rank's, in place (no-op in a single process)."""
    dist = _dist()
    if dist is not None:
        dist.broadcast(t, src=0, group=_module(DISTRIBUTED).get_tp_group().cpu_group)


def scatter(out: torch.Tensor, parts: Optional[list[torch.Tensor]]) -> None:
    """TP rank ``r`` receives ``parts[r]`` (given on rank 0, device tensors) into ``out``."""
    dist = _dist()
    if dist is None:
        assert parts is not None
        out.copy_(parts[0])
        return
    dist.scatter(out, scatter_list=parts, src=0, group=_module(DISTRIBUTED).get_tp_group().device_group)


def capturing() -> bool:
    """Inside a CUDA graph capture (no host copies, no synchronization allowed)."""
    return bool(torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def synchronize() -> None:
    """Wait for the device: the previous forward's kernels and CPU tasks read the slots and masks."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --- expert weights ----------------------------------------------------------------------------------

class ExpertWriter:
    """Writes one expert's GPU-format weights into a slot of the layer on every TP rank: rank 0 has
    kt-kernel write every rank's partition into page-locked host buffers (one expert each), then each
    rank gets its partition (a scatter under TP) and copies it into the slot."""

    def __init__(self, state: LayerState, rank: int, size: int) -> None:
        self.state, self.rank, self.size = state, rank, size
        pin = torch.cuda.is_available()
        self.host: list[dict[str, torch.Tensor]] = []
        if rank == 0:
            if state.writer is None:
                raise UnsupportedHost(f"MoE layer {state.layer_id}: TP rank 0 has no kt-kernel wrapper to "
                                      f"read expert weights from")
            for _ in range(size):
                self.host.append({n: torch.empty(t.shape[1:], dtype=t.dtype, pin_memory=pin)
                                  for n, t in state.weights.items()})
        self.recv = {n: torch.empty(t.shape[1:], dtype=t.dtype, device=t.device)
                     for n, t in state.weights.items()} if size > 1 else {}

    def write(self, expert: int, slot: int) -> None:
        st = self.state
        if self.rank == 0:
            ptrs = {n: [b[n].data_ptr() for b in self.host] for n in st.weights}
            st.writer.submit_write_weight_scale_to_buffer(self.size, int(expert), ptrs["w13_weight"],
                                                          [0] * self.size, ptrs["w2_weight"], [0] * self.size)
            st.writer.sync_write_weight_scale_to_buffer()
        for n, dst in st.weights.items():
            if self.size == 1:
                dst[slot].copy_(self.host[0][n], non_blocking=False)
                continue
            parts = [b[n].to(dst.device) for b in self.host] if self.rank == 0 else None
            scatter(self.recv[n], parts)
            dst[slot].copy_(self.recv[n])


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` keeping ``dst``'s storage (the host's tensors are read by captured graphs
    and by the C++ kernel through their addresses)."""
    ptr = dst.data_ptr()
    dst.copy_(src)
    assert dst.data_ptr() == ptr


# --- forwards ----------------------------------------------------------------------------------------

def forward_kind(forward_batch: Any) -> tuple[str, int]:
    """``("decode" | "prefill" | "idle", rows)`` of a forward (prefill: extend, mixed and the rest)."""
    mode = forward_batch.forward_mode
    rows = int(getattr(forward_batch, "batch_size", 0) or 0)
    if mode.is_idle():
        return "idle", rows
    return ("decode" if mode.is_decode() else "prefill"), rows


def install_step_hook(callback: Callable[[Any, Any], None]) -> None:
    """Call ``callback(model_runner, forward_batch)`` before every ``ModelRunner.forward`` (once per
    process; a second call replaces the callback)."""
    cls = _module(MODEL_RUNNER).ModelRunner
    original = getattr(cls.forward, "_hybrimoe_original", cls.forward)

    @functools.wraps(original)
    def forward(self: Any, forward_batch: Any, *args: Any, **kwargs: Any) -> Any:
        callback(self, forward_batch)
        return original(self, forward_batch, *args, **kwargs)

    forward._hybrimoe_original = original  # type: ignore[attr-defined]
    cls.forward = forward
