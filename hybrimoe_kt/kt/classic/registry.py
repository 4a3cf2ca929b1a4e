"""The one runtime that every classic HybriMoE operator of a model shares, built without an attach call.

kTransformers constructs all operators of a model (under meta) before it loads any, then calls each
one's ``load()``; it has no step after loading where a plugin could gather them. So the operators of one
model meet in a ``ModelRuntime``, found by the model's GGUF loader object (one per model; the config
when the loader cannot be a weak key):

- construction ``join``s it (the settings must equal the other members': one runtime, one cache);
- ``load()`` hands it the layer's quantized blocks; when every member has loaded, it builds the
  HybridMoE over all of them (MoE layers ordered by decoder layer) and gives each member its index;
- ``runtime()`` (every forward) returns it, building it first when it is not built yet;
- ``leave_loaded`` (``unload()``) takes the member's blocks back and drops the runtime (its store holds
  every layer): it is built again once every member has loaded again. A member that joins after the
  runtime was built also drops it.

The registry holds its members weakly and never the loader, so a model that is freed takes its runtime
with it.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Optional

import torch

from hybrimoe_kt.core.memory import DEFAULT_CONTEXT_TOKENS, check_runtime_memory
from hybrimoe_kt.kernels.gguf_experts import GgufExperts, GgufLayerExperts
from hybrimoe_kt.kt.classic.preset import classic_preset
from hybrimoe_kt.kt.operators import RuntimeSettings
from hybrimoe_kt.kt.runtime_attach import MemoryCheck, build_runtime
from hybrimoe_kt.runtime.device import Tier
from hybrimoe_kt.runtime.moe import HybridMoE
from hybrimoe_kt.runtime.store_gguf import GgufExpertStore

log = logging.getLogger(__name__)

Bind = Callable[[Optional[HybridMoE], int], None]  # a member's hook: (runtime or None, its MoE index)


class ModelRuntime:
    def __init__(self) -> None:
        self.members: dict[int, weakref.ReferenceType] = {}   # decoder layer -> operator
        self.keys: dict[int, str] = {}
        self.settings: Optional[RuntimeSettings] = None
        self.blocks: dict[int, GgufLayerExperts] = {}         # loaded layers' quantized experts
        self.current: Optional[HybridMoE] = None
        self.builds = 0

    def join(self, op: Any, layer: int, key: str, settings: RuntimeSettings) -> None:
        live = self._live()
        if layer in live and live[layer] is not op:
            raise ValueError(f"{key}: decoder layer {layer} already has a HybriMoE experts operator "
                             f"({self.keys[layer]}); one rule must match each layer's experts once")
        if self.settings is not None and live and settings != self.settings:
            first = self.keys[min(live)]
            raise ValueError(f"{key}: its kwargs or devices differ from {first}'s; the HybriMoE operators of "
                             f"one model share one runtime and need the same settings ({settings} vs "
                             f"{self.settings})")
        if self.current is not None:
            log.info("%s joined after the runtime was built; it is rebuilt over all layers", key)
            self._drop()
        self.members[layer], self.keys[layer] = weakref.ref(op), key
        self.settings = settings

    def loaded(self, layer: int, blocks: GgufLayerExperts) -> None:
        """A member's blocks are read; the runtime is built once every member has them."""
        self.blocks[layer] = blocks
        if self.current is None and set(self._live()) <= set(self.blocks):
            self._build()

    def leave_loaded(self, layer: int) -> None:
        self.blocks.pop(layer, None)
        if self.current is not None:
            self._drop()

    def runtime(self, key: str) -> HybridMoE:
        if self.current is None:
            missing = sorted(set(self._live()) - set(self.blocks))
            if missing:
                names = ", ".join(self.keys[m] for m in missing)
                raise RuntimeError(f"{key}: the shared HybriMoE runtime needs every MoE layer loaded; not "
                                   f"loaded: {names}. Call load() (kTransformers does at model load) - "
                                   f"layer-wise prefill (per_layer_prefill_intput_threshold > 0), which "
                                   f"unloads layers, is not supported: set it to 0")
            self._build()
        assert self.current is not None
        return self.current

    # --- internals ----------------------------------------------------------------------------------
    def _live(self) -> dict[int, Any]:
        live = {layer: ref() for layer, ref in self.members.items()}
        dead = [layer for layer, op in live.items() if op is None]
        for layer in dead:
            del self.members[layer]
            self.blocks.pop(layer, None)
        return {layer: op for layer, op in live.items() if op is not None}

    def _drop(self) -> None:
        for op in self._live().values():
            op._bind(None, -1)
        self.current = None

    def _build(self) -> None:
        live = self._live()
        layers = sorted(live)
        s = self.settings
        assert s is not None and layers
        tier = Tier(s.device)
        store = GgufExpertStore(GgufExperts({i: self.blocks[i] for i in layers}), layers, pin=tier.pin_ok())
        config = live[layers[0]].config  # the model's config (every member was built with it)
        top_k = int(getattr(config, "num_experts_per_tok", 0) or 0)
        if top_k < 1:
            raise ValueError(f"{self.keys[layers[0]]}: the config has no num_experts_per_tok (the router's top-k)")
        preset = classic_preset(config, store.n_layers, store.n_experts, top_k, store.hidden,
                                store.intermediate)
        kv_bytes = preset.kv_bytes_per_token() * DEFAULT_CONTEXT_TOKENS
        runtime = build_runtime(store, s, tier, preset, top_k, self.keys[layers[0]], "KHybriMoEExperts",
                                _memory_check(tier, kv_bytes))
        for index, layer in enumerate(layers):
            live[layer]._bind(runtime, index)
        self.current = runtime
        self.builds += 1
        log.info("HybriMoE runtime under kTransformers: %d MoE layers, %d experts, strategy %s, %d GPU slots, "
                 "GPU tier: %s", store.n_layers, store.n_experts, runtime.spec.name, runtime.cache.capacity,
                 runtime.label)


def _memory_check(tier: Tier, kv_bytes: int) -> MemoryCheck:
    """Refuse an expert cache that does not fit the GPU's free memory beside the KV cache still to come
    (kTransformers allocates it when generation starts); nothing to check on the CPU stand-in."""
    def check(slot_bytes: int, slots: int, max_slots: int) -> None:
        if not tier.is_cuda:
            return
        free, _ = torch.cuda.mem_get_info(tier.device)
        check_runtime_memory(int(free), int(torch.cuda.memory_allocated(tier.device)), kv_bytes, slot_bytes,
                             slots, max_slots)
    return check


_REGISTRIES: "weakref.WeakKeyDictionary[Any, ModelRuntime]" = weakref.WeakKeyDictionary()


def model_runtime(gguf_loader: Any, config: Any, key: str) -> ModelRuntime:
    """The registry of the model whose operators were built with ``gguf_loader`` (or ``config``)."""
    for owner in (gguf_loader, config):
        if owner is None:
            continue
        try:
            reg = _REGISTRIES.get(owner)
        except TypeError:  # not weakly referenceable
            continue
        if reg is None:
            reg = _REGISTRIES[owner] = ModelRuntime()
        return reg
    raise ValueError(f"{key}: the HybriMoE operators of a model meet through its gguf_loader or config "
                     f"object; got {type(gguf_loader).__name__} and {type(config).__name__}, neither of "
                     f"which can be weakly referenced")
