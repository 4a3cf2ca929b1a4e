"""GPU memory as a budget: what must stay resident, what the expert cache of a ratio costs, what fits.

Resident on the GPU, whatever the cache: attention, shared experts, dense layers, embeddings and LM
head in the GPU weight format (routers and norms in bf16), the KV cache of the workload, and a fixed
reserve. The expert cache of a cache ratio is ``round(ratio * n_experts)`` slots per MoE layer (the
rounding of ``core.strategies.slots_for``) times the model's MoE layers times ``expert_bytes(gpu_format)``.
A strategy that streams long prefills (``core.stream``) also holds its two staging buffers. A ratio
whose total exceeds the GPU is refused with one line: GiB needed, GiB available, largest ratio. The
expert slots hold the host's format (a GGUF model's own blocks), the other GPU weights their own
(``dense_format``; bf16 in the runtime).

Counting embeddings on the GPU is conservative: kTransformers' rules keep the embedding lookup on the
CPU, which frees ``vocab * hidden`` weights. The KV cache of MLA models (DeepSeek) is the compressed
latent (kTransformers/SGLang); the runtime on Hugging Face transformers caches full per-head K/V and
checks its own numbers (``check_runtime_memory``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

from hybrimoe_kt.core.models import ModelPreset, bits_per_weight

log = logging.getLogger(__name__)

GIB = 2**30
# Reserved beyond weights and KV cache: the CUDA context and cuBLAS workspaces (~0.3-0.6 GiB on
# recent drivers), the activations of one prefill chunk, and allocator fragmentation. An estimate;
# ``MemoryWorkload.reserve_gib`` overrides it.
RESERVE_GIB = 1.0
DEFAULT_CONTEXT_TOKENS = 4096   # KV cache sized for this many tokens per sequence
DEFAULT_BATCH = 1
KV_DTYPE_BYTES = 2              # bf16 KV cache
UNQUANTIZED_PARTS = ("routers_norms",)  # stay bf16 whatever the GPU weight format


@dataclass(frozen=True, slots=True)
class MemoryWorkload:
    context_tokens: int = DEFAULT_CONTEXT_TOKENS
    batch: int = DEFAULT_BATCH
    reserve_gib: float = RESERVE_GIB

    def __post_init__(self) -> None:
        if self.context_tokens < 1 or self.batch < 1:
            raise ValueError(f"workload needs context_tokens >= 1 and batch >= 1, got "
                             f"{self.context_tokens} x {self.batch}")
        if self.reserve_gib < 0:
            raise ValueError(f"reserve_gib must be >= 0, got {self.reserve_gib}")


@dataclass(frozen=True, slots=True)
class MemoryBudget:
    """Bytes of everything resident besides the expert cache, and what one cache slot per layer costs."""

    model: str
    gpu_format: str
    gpu_mem_gib: float        # 0 = unknown: nothing is refused
    resident: dict[str, int]  # part -> bytes (weights, kv_cache, reserve)
    expert_bytes: int         # one routed expert in the GPU format
    n_moe_layers: int
    n_experts: int

    @property
    def resident_bytes(self) -> int:
        return sum(self.resident.values())

    @property
    def known(self) -> bool:
        return self.gpu_mem_gib > 0

    def cache_bytes(self, ratio: float) -> int:
        """Expert cache bytes of a cache ratio (slots rounded per layer as the strategies do)."""
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"cache ratio must be in [0, 1], got {ratio}")
        return int(round(ratio * self.n_experts)) * self.n_moe_layers * self.expert_bytes

    def fits(self, ratio: float) -> bool:
        return not self.known or self.resident_bytes + self.cache_bytes(ratio) <= self.gpu_mem_gib * GIB

    def max_ratio(self) -> Optional[float]:
        """The largest ratio k / n_experts that fits; None when even the resident part does not fit."""
        if not self.known:
            return 1.0
        free = self.gpu_mem_gib * GIB - self.resident_bytes
        if free < 0:
            return None
        k = min(self.n_experts, int(free // (self.n_moe_layers * self.expert_bytes)))
        return k / self.n_experts

    def breakdown(self, ratio: float) -> dict[str, float]:
        """GiB by part, the expert cache, the total and the GPU's memory (for records)."""
        out = {k: round(v / GIB, 4) for k, v in self.resident.items()}
        out["expert_cache"] = round(self.cache_bytes(ratio) / GIB, 4)
        out["total"] = round((self.resident_bytes + self.cache_bytes(ratio)) / GIB, 4)
        out["gpu_mem"] = self.gpu_mem_gib
        return out

    def check(self, ratio: float, where: str = "") -> None:
        """Refuse a cache ratio that does not fit, in one line (no-op when the GPU size is unknown)."""
        if self.fits(ratio):
            return
        need = (self.resident_bytes + self.cache_bytes(ratio)) / GIB
        best = self.max_ratio()
        largest = (f"the largest cache ratio that fits is {best:.4g} (--cache-ratio max)" if best is not None
                   else "no cache ratio fits: the weights besides the routed experts alone do not; "
                        "use a smaller context, a smaller GPU weight format or a larger GPU")
        raise ValueError(f"cache ratio {ratio:g} of {self.model} ({self.gpu_format} on the GPU) needs "
                         f"{need:.1f} GiB (expert cache {self.cache_bytes(ratio) / GIB:.1f} + resident "
                         f"weights {self.weight_bytes / GIB:.1f} + KV cache {self.resident['kv_cache'] / GIB:.1f}"
                         f" + reserve {self.resident['reserve'] / GIB:.1f}{self._staging_text()}), "
                         f"{where or 'the GPU'} has "
                         f"{self.gpu_mem_gib:g} GiB; {largest}")

    def _staging_text(self) -> str:
        b = self.resident.get("stream_buffers", 0)
        return f" + stream buffers {b / GIB:.1f}" if b else ""

    @property
    def weight_bytes(self) -> int:
        return (self.resident_bytes - self.resident["kv_cache"] - self.resident["reserve"]
                - self.resident.get("stream_buffers", 0))


def memory_budget(model: ModelPreset, gpu_format: str, gpu_mem_gib: float,
                  workload: MemoryWorkload = MemoryWorkload(), dense_format: Optional[str] = None,
                  staging_experts: int = 0) -> MemoryBudget:
    """``gpu_format``: the expert slots; ``dense_format``: the other GPU weights (default: the same);
    ``staging_experts``: slots of the layer-streaming prefill's staging buffers (``core.stream``) or of
    the layer-wise prefill's full-layer buffer (``core.layerwise``)."""
    if gpu_mem_gib < 0:
        raise ValueError(f"gpu_mem_gib must be >= 0 (0 = unknown), got {gpu_mem_gib}")
    if staging_experts < 0:
        raise ValueError(f"staging_experts must be >= 0, got {staging_experts}")
    bpw = bits_per_weight(dense_format or gpu_format)
    parts = {k: int(round(n * (16.0 if k in UNQUANTIZED_PARTS else bpw) / 8))
             for k, n in model.resident_params().items()}
    if not model.kv_known:
        log.info("model %s has no KV cache shape: its KV cache is not counted", model.name)
    parts["kv_cache"] = model.kv_bytes_per_token(KV_DTYPE_BYTES) * workload.context_tokens * workload.batch
    parts["reserve"] = int(round(workload.reserve_gib * GIB))
    if staging_experts:
        parts["stream_buffers"] = staging_experts * model.expert_bytes(gpu_format)
    return MemoryBudget(model.name, gpu_format, float(gpu_mem_gib), parts, model.expert_bytes(gpu_format),
                        model.n_moe_layers, model.n_experts)


def max_cache_ratio(model: ModelPreset, gpu_format: str, gpu_mem_gib: float,
                    workload: MemoryWorkload = MemoryWorkload(), dense_format: Optional[str] = None,
                    staging_experts: int = 0) -> float:
    """The largest cache ratio whose expert cache fits beside the resident part; ValueError if none."""
    if not gpu_mem_gib > 0:
        raise ValueError(f"the largest cache ratio needs the GPU's memory size, got gpu_mem_gib="
                         f"{gpu_mem_gib}: set gpu_mem_gib in the hardware profile")
    b = memory_budget(model, gpu_format, gpu_mem_gib, workload, dense_format=dense_format,
                      staging_experts=staging_experts)
    best = b.max_ratio()
    if best is None:
        b.check(0.0)  # raises with the numbers
    assert best is not None
    return best


def cache_ratio_for_gib(model: ModelPreset, gpu_format: str, cache_gib: float) -> float:
    """The largest cache ratio whose expert cache is at most ``cache_gib`` GiB (whole slots per layer)."""
    if not (cache_gib >= 0 and math.isfinite(cache_gib)):
        raise ValueError(f"expert cache size must be a finite number of GiB >= 0, got {cache_gib}")
    per_slot = model.n_moe_layers * model.expert_bytes(gpu_format)  # one slot in every MoE layer
    k = min(model.n_experts, int(cache_gib * GIB // per_slot))
    if cache_gib > 0 and k == 0:
        raise ValueError(f"an expert cache of {cache_gib:g} GiB holds no slot per layer for {model.name}: "
                         f"one slot in each of its {model.n_moe_layers} MoE layers takes "
                         f"{per_slot / GIB:.2f} GiB in {gpu_format}")
    return k / model.n_experts


def check_runtime_memory(free_bytes: int, loaded_bytes: int, kv_bytes: int, slot_bytes: int, slots: int,
                         max_slots: int, reserve_bytes: int = int(RESERVE_GIB * GIB)) -> None:
    """The runtime's check at load, from numbers: ``free_bytes`` on the device now (after the resident
    weights, ``loaded_bytes``, were placed there), the KV cache still to come, and ``slots`` expert
    slots of ``slot_bytes``. Refuses in one line with the largest slot count and ratio that fit."""
    if min(free_bytes, loaded_bytes, kv_bytes, slot_bytes, slots, max_slots, reserve_bytes) < 0 \
            or slot_bytes == 0 or max_slots == 0:
        raise ValueError(f"memory check needs sizes >= 0 and slot_bytes, max_slots > 0, got free={free_bytes} "
                         f"loaded={loaded_bytes} kv={kv_bytes} slot={slot_bytes} slots={slots}/{max_slots}")
    need = kv_bytes + reserve_bytes + slots * slot_bytes
    if need <= free_bytes:
        return
    fit = max(0, min(max_slots, (free_bytes - kv_bytes - reserve_bytes) // slot_bytes))
    raise ValueError(f"GPU expert cache of {slots} slots needs {(loaded_bytes + need) / GIB:.1f} GiB (slots "
                     f"{slots * slot_bytes / GIB:.1f} + resident weights {loaded_bytes / GIB:.1f} + KV cache "
                     f"{kv_bytes / GIB:.1f} + reserve {reserve_bytes / GIB:.1f}), the GPU has "
                     f"{(free_bytes + loaded_bytes) / GIB:.1f} GiB available; the largest that fits is {fit} "
                     f"slots (cache_ratio {fit / max_slots:.4g} or gpu_slots: {fit} in the rule kwargs)")
