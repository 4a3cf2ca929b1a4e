"""Build the one runtime that all HybriMoE operators of a model share, after the rules are applied."""

from __future__ import annotations

import logging
import re
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch

from hybrimoe_kt.core.cost import RooflineCost
from hybrimoe_kt.core.hardware import load_profile
from hybrimoe_kt.core.memory import DEFAULT_CONTEXT_TOKENS, check_runtime_memory
from hybrimoe_kt.core.models import ModelPreset
from hybrimoe_kt.core.strategies import get_strategy, slots_for, with_overrides
from hybrimoe_kt.core.stream import staging_slots
from hybrimoe_kt.kt.operators import HybriMoEExperts, RuntimeSettings
from hybrimoe_kt.runtime.device import Tier, real_host
from hybrimoe_kt.runtime.moe import HybridMoE
from hybrimoe_kt.runtime.store import HostExpertStore, LayerWeights
from hybrimoe_kt.runtime.store_gguf import GgufExpertStore

log = logging.getLogger(__name__)


def preset_from_config(config: Any, n_moe_layers: int, n_experts: int, top_k: int, hidden: int,
                       inter: int, model: torch.nn.Module) -> ModelPreset:
    """A model preset for the cost model, from a loaded model (attention weights counted exactly)."""
    n_layers = int(getattr(config, "num_hidden_layers", n_moe_layers))
    attn = sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n) // max(1, n_layers)
    shared = int(getattr(config, "shared_expert_intermediate_size", 0) or 0) or \
        int(getattr(config, "n_shared_experts", 0) or 0) * inter
    return ModelPreset(str(getattr(config, "model_type", "model")), str(getattr(config, "_name_or_path", "")),
                       n_layers, n_layers - n_moe_layers, n_experts, top_k,
                       int(getattr(config, "n_shared_experts", 0) or (1 if shared else 0)), hidden, inter, shared,
                       attn, int(getattr(config, "vocab_size", 0)))


def _counts(path: Optional[str], n_layers: int, n_experts: int) -> Optional[np.ndarray]:
    if path is None:
        return None
    p = Path(path)
    if p.suffix == ".npy":
        counts = np.load(p)
    else:
        from hybrimoe_kt.traces.format import load_trace

        counts = load_trace(p).expert_counts()
    if counts.shape != (n_layers, n_experts):
        raise ValueError(f"placement counts {path} have shape {counts.shape}, the model needs "
                         f"({n_layers}, {n_experts})")
    return counts


def apply_overrides(s: RuntimeSettings, overrides: Optional[Mapping[str, Any]]) -> RuntimeSettings:
    """``s`` with the named settings replaced (e.g. ``{"cpu_threads": 8}`` from a command-line flag)."""
    if not overrides:
        return s
    known = {f.name for f in fields(RuntimeSettings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown runtime setting override(s) {unknown}; known: {sorted(known)}")
    log.info("runtime settings overridden: %s", dict(overrides))
    return replace(s, **dict(overrides))


def gguf_store(path: str | Path, layer_ids: list[int], n_experts: int, pin: bool = False) -> GgufExpertStore:
    """The routed experts of the MoE layers ``layer_ids`` from a GGUF file (or the one .gguf in a folder);
    ``pin``: held in page-locked host memory instead of the file mapping (the GPU tier is CUDA)."""
    from hybrimoe_kt.kernels.gguf_experts import GgufExperts
    from hybrimoe_kt.kt.gguf_io import read_gguf_experts

    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.gguf"))
        if len(files) != 1:
            raise ValueError(f"--gguf-path {p} must hold exactly one .gguf file, found {len(files)}")
        p = files[0]
    experts = GgufExperts.from_tensors(read_gguf_experts(p))
    missing = sorted(set(layer_ids) - set(experts.layers))
    if missing:
        raise ValueError(f"GGUF file {p} has no routed experts for decoder layer(s) {missing}")
    store = GgufExpertStore(experts, layer_ids, pin=pin)
    if store.n_experts != n_experts:
        raise ValueError(f"GGUF file {p} has {store.n_experts} experts per layer, the model {n_experts}")
    return store


def hf_kv_bytes_per_token(config: Any, dtype_bytes: int = 2) -> int:
    """KV cache bytes per token as Hugging Face transformers stores it: K and V for every layer. MLA
    configs (``kv_lora_rank``, DeepSeek) cache decompressed per-head K (nope + rope) and V there."""
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    if layers == 0 or heads == 0:
        return 0  # no attention shape in the config: the KV cache is not counted
    if getattr(config, "kv_lora_rank", None):
        per_layer = heads * (int(config.qk_nope_head_dim) + int(config.qk_rope_head_dim) + int(config.v_head_dim))
    else:
        head_dim = int(getattr(config, "head_dim", 0) or int(config.hidden_size) // max(1, heads))
        per_layer = 2 * int(getattr(config, "num_key_value_heads", 0) or heads) * head_dim
    return layers * per_layer * dtype_bytes


def check_gpu_memory(model: torch.nn.Module, device: str, slot_bytes: int, slots: int, max_slots: int,
                     context_tokens: int = DEFAULT_CONTEXT_TOKENS) -> None:
    """Refuse at load an expert cache that does not fit the GPU beside the weights already on it and the
    KV cache of ``context_tokens`` (batch 1). Skipped on the CPU stand-in (nothing to run out of)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return  # CPU stand-in; a cuda device without CUDA is refused by runtime.device.Tier
    dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    free, _ = torch.cuda.mem_get_info(dev)
    tensors = [*model.parameters(), *model.buffers()]
    loaded = sum(t.numel() * t.element_size() for t in tensors if t.device == dev)
    dtype_bytes = tensors[0].element_size() if tensors else 2
    kv = hf_kv_bytes_per_token(getattr(model, "config", None), dtype_bytes) * context_tokens
    check_runtime_memory(int(free), loaded, kv, slot_bytes, slots, max_slots)


def _mark_forward_start(model: torch.nn.Module, first_key: str, runtime: HybridMoE) -> None:
    """Call ``runtime.begin_forward(is_prefill)`` when the decoder layer of the first MoE operator starts,
    so the first MoE layer's time given to the controller includes its attention, and a step upkeep
    runs before it, as the simulator's does.
    Falls back to the model's own forward start when that decoder layer cannot be found by name."""
    m = re.match(r"^(.*?(?:^|\.)layers\.\d+)\.", first_key)
    target: torch.nn.Module = model
    if m is not None:
        try:
            target = model.get_submodule(m.group(1))
        except AttributeError:
            log.debug("no module %s in the model; marking forward starts at the model's forward", m.group(1))
    target.register_forward_pre_hook(lambda _m, args, kwargs: runtime.begin_forward(_phase(args, kwargs)),
                                     with_kwargs=True)


def _phase(args: tuple, kwargs: dict) -> Optional[bool]:
    """Whether a decoder layer's call is a prefill: more than one position in its hidden states
    ``[B, T, H]`` (None when they cannot be found: the runtime then decides from the rows)."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor) and hidden.dim() >= 2:
        return bool(hidden.shape[-2] > 1)
    return None


MemoryCheck = Callable[[int, int, int], None]  # (slot bytes, slots, most slots) -> raises when they do not fit


def build_runtime(store: HostExpertStore | GgufExpertStore, s: RuntimeSettings, tier: Tier, preset: ModelPreset,
                  top_k: int, key: str, operator: str, check_memory: MemoryCheck) -> HybridMoE:
    """The HybridMoE of ``store`` under settings ``s``: the strategy, the GPU slot count from the budget,
    the cost model (``preset`` with the store's real expert bytes), the placement counts, the memory
    check (``check_memory``), the CPU kernels. ``key`` and ``operator`` name the first MoE operator in
    errors."""
    spec = get_strategy(s.strategy)
    if s.prefetch_depth is not None:
        spec = with_overrides(spec, prefetch_depth=int(s.prefetch_depth))
    if s.prefetch is not None:  # e.g. 'hidden': the next block's router predicts (kt.hidden_hook)
        spec = with_overrides(spec, name=f"{spec.name}/{s.prefetch}", prefetch=str(s.prefetch))
    n_l, n_e = store.n_layers, store.n_experts
    if s.gpu_slots is not None:
        total = int(s.gpu_slots)
    elif s.gpu_gib is not None:
        total = int(float(s.gpu_gib) * 2**30 // store.expert_bytes())
    else:
        total = slots_for(replace(spec, pool="global"), n_l, n_e, float(s.cache_ratio or 0.0))
    slots = total if spec.pool == "global" else total // n_l
    host_bytes = (store.quantized_bytes() // (n_l * n_e) if hasattr(store, "quantized_bytes")
                  else store.expert_bytes())  # one expert as the CPU tier reads it
    cost = RooflineCost.build(load_profile(s.hardware_profile), preset, "bf16", "bf16",
                              expert_bytes=(host_bytes, store.expert_bytes()))
    counts = _counts(s.placement_counts, n_l, n_e)
    if spec.eviction == "static" and slots > 0 and counts is None:
        raise ValueError(f"{key}: strategy {spec.name} ({operator}) keeps a fixed GPU expert "
                         f"set chosen by calibration frequency and needs calibration counts: add "
                         f"'placement_counts: <routing trace or .npy of [L, E] counts>' to the rule's kwargs "
                         f"(record a trace on other prompts with 'hybrimoe-kt record'), or give it no GPU "
                         f"budget (cache_ratio: 0)")
    staging = staging_slots(spec.stream_buffer, n_e) if spec.prefill_stream else 0
    check_memory(store.expert_bytes(), (slots if spec.pool == "global" else slots * n_l) + staging,
                 n_l * n_e + staging)
    return HybridMoE(store, tier, spec, slots, cost, top_k, counts=counts,
                     cpu_backend=s.cpu_backend, cpu_threads=s.cpu_threads)


def attach_runtime(model: torch.nn.Module, top_k: Optional[int] = None,
                   overrides: Optional[Mapping[str, Any]] = None,
                   gguf_path: Optional[str | Path] = None) -> Optional[HybridMoE]:
    """Gather every HybriMoEExperts operator of ``model`` into one HybridMoE; None if there is none.
    ``overrides``: RuntimeSettings fields that replace what the rule kwargs say (same for all layers).
    ``gguf_path``: take the routed experts from this GGUF file (kept quantized for the CPU kernels;
    blocks ``blk.<decoder layer>.ffn_*_exps``) instead of the model folder's weights."""
    ops = sorted((m for m in model.modules() if isinstance(m, HybriMoEExperts)), key=lambda m: m.layer_index)
    if not ops:
        return None
    settings = {op.settings for op in ops}
    if len(settings) != 1:
        raise ValueError("the HybriMoE operators of one model share a runtime and must have the same "
                         f"rule kwargs and devices; got {len(settings)} different settings")
    s: RuntimeSettings = apply_overrides(settings.pop(), overrides)
    config = getattr(model, "config", None)
    k = top_k or int(getattr(config, "num_experts_per_tok", 0) or 0)
    if k < 1:
        raise ValueError("cannot tell the model's top-k (config.num_experts_per_tok); pass top_k")
    tier = Tier(s.device)
    store: HostExpertStore | GgufExpertStore
    if gguf_path is not None:  # slot copies read the store: pinned when the tier is CUDA
        store = gguf_store(gguf_path, [op.layer_index for op in ops], ops[0].n_experts, pin=tier.pin_ok())
    else:
        layers = []
        for op in ops:
            if op.weights is None:
                raise ValueError(f"{op.key}: its weights were already handed to a runtime")
            layers.append(LayerWeights(*op.weights))
        with real_host():  # host memory: real tensors even under FakeTensorMode
            # slot copies read the store: page-locked when the tier is CUDA (one layer copied at a time)
            store = HostExpertStore.page_locked(layers) if tier.pin_ok() else HostExpertStore(layers)
    for op in ops:
        op.weights = None  # the store holds the only host copy
    preset = preset_from_config(config, store.n_layers, store.n_experts, k, store.hidden, store.intermediate,
                                model)
    runtime = build_runtime(store, s, tier, preset, k, ops[0].key, type(ops[0]).__name__,
                            lambda slot_bytes, slots, max_slots: check_gpu_memory(model, s.device, slot_bytes,
                                                                                  slots, max_slots))
    n_l, n_e, spec = store.n_layers, store.n_experts, runtime.spec
    for i, op in enumerate(ops):
        op.runtime, op.moe_index = runtime, i
    _mark_forward_start(model, ops[0].key, runtime)
    if spec.prefetch == "hidden":
        from hybrimoe_kt.kt.hidden_hook import attach_next_routers

        log.info("hidden-state predictors: %d next-layer routers", attach_next_routers(model, ops, runtime))
    log.info("HybriMoE runtime: %d MoE layers, %d experts, strategy %s, %d GPU slots, GPU tier: %s",
             n_l, n_e, spec.name, runtime.cache.capacity, runtime.label)
    return runtime
