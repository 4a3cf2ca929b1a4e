"""Layer-wise GPU prefill and batch re-placement: how sglang-kt's kt-kernel wrapper runs long prefills.

The strategy ``kt-dynamic-update`` models two flags of the kvcache-ai SGLang fork (sglang-kt), as
its ``KTEPWrapperMethod`` (``python/sglang/srt/layers/moe/kt_ep_wrapper.py``) implements them:

- ``--kt-gpu-prefill-token-threshold T`` (``KTEPWrapperMethod.apply``): a layer call with at least
  ``T`` tokens (``num_tokens >= T``) does not split the experts. The wrapper copies the whole layer
  into one full-layer GPU buffer shared by all layers (``SharedFullContext.load``: every expert goes
  host -> GPU through the CPU kernel's weight writer, in expert-id order; only the BF16 path copies the
  experts already on the GPU device-to-device instead), synchronizes, and computes every routed token
  on the GPU. No CPU expert runs in that layer call.
- ``--kt-enable-dynamic-expert-update`` (``_update_gpu_experts_from_batch``,
  ``select_top_experts_from_batch``): right after such a layer call, the layer's GPU experts become
  the batch's most activated experts of that layer (tokens that selected each one, ties by lowest id,
  experts no token chose filling up by lowest id), as many as the layer held (``num_gpu_experts`` of
  the layer, fixed at load time), copied device-to-device from the full-layer buffer; the masks the
  CPU kernel and the GPU kernel read are rewritten in place. Per layer, never across layers; decode
  forwards below the threshold never change anything.

``LayerwisePrefill`` holds these decisions (the controller applies them; the simulator charges the
copies on the copy queue and the device copies on the GPU). Not modelled: the CPU-side format
conversion of the weight writer (it overlaps the PCIe copies, which bound it), and decode batches
large enough to reach the threshold (the wrapper would run those layer-wise too; the decode path
here never does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection

import numpy as np

from hybrimoe_kt.core.types import ExpertId, LayerRouting

KT_PREFILL_THRESHOLD = 500
"""Tokens per forward from which ``kt-dynamic-update`` runs a layer on the GPU: the default that
kt-kernel's ``kt run`` interactive setup writes for ``--kt-gpu-prefill-token-threshold``
(``kt_kernel/cli/utils/run_interactive.py``); its model registry uses 400 to 4096 per model."""


def batch_top(routing: LayerRouting, n_experts: int, n: int) -> tuple[int, ...]:
    """The ``n`` experts of ``routing``'s layer that the most rows selected (ties by lowest id; experts
    no row selected fill up by lowest id), sorted by id (``select_top_experts_from_batch``)."""
    if not 0 <= n <= n_experts:
        raise ValueError(f"batch_top: n={n} must be in 0..{n_experts}")
    counts = np.zeros(n_experts, dtype=np.int64)
    for e, t in zip(routing.experts, routing.tokens):
        if 0 <= e < n_experts:
            counts[e] = t
    order = np.lexsort((np.arange(n_experts), -counts))[:n]
    return tuple(sorted(int(e) for e in order))


@dataclass(frozen=True, slots=True)
class Replacement:
    """One layer's re-placement after a layer-wise call: ``evictions[i]`` gives its slot to
    ``admissions[i]`` (a device-to-device copy from the full-layer buffer); ``copy_s``: the GPU time the
    copies take after the layer's compute (the wrapper copies synchronously)."""

    layer: int
    evictions: tuple[ExpertId, ...]
    admissions: tuple[ExpertId, ...]
    copy_s: float


class LayerwisePrefill:
    """The layer-wise prefill policy of a strategy (see the module docstring).

    ``threshold``: rows of a prefill forward from which a layer runs on the GPU; ``reload_residents``:
    the full-layer copy includes the layer's GPU experts (the wrapper's quantized formats: INT4,
    FP8, MXFP4) or copies only the others (its BF16 path); ``replace``: re-place the layer's GPU
    experts from the batch afterwards (dynamic expert update).
    """

    def __init__(self, threshold: int, reload_residents: bool = True, replace: bool = False) -> None:
        if int(threshold) != threshold or threshold < 1:
            raise ValueError(f"layer-wise prefill threshold must be an integer >= 1 (tokens), got {threshold!r}")
        self.threshold = int(threshold)
        self.reload_residents = bool(reload_residents)
        self.replace = bool(replace)

    def applies(self, n_rows: int, is_prefill: bool) -> bool:
        """Whether a layer call of ``n_rows`` rows runs layer-wise (prefill forwards only)."""
        return is_prefill and n_rows >= self.threshold

    def copies(self, n_experts: int, resident: Collection[int]) -> tuple[int, ...]:
        """Experts copied host -> GPU into the full-layer buffer, in copy order (expert id)."""
        if self.reload_residents:
            return tuple(range(n_experts))
        return tuple(e for e in range(n_experts) if e not in resident)

    def swaps(self, routing: LayerRouting, n_experts: int, resident: Collection[int]
              ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(evicted, admitted)`` expert ids of the layer (paired in order, both sorted) that make its
        GPU experts the batch's top ones; empty when the strategy does not re-place."""
        if not self.replace:
            return (), ()
        top = set(batch_top(routing, n_experts, len(resident)))
        evicted = tuple(sorted(e for e in resident if e not in top))
        admitted = tuple(sorted(e for e in top if e not in resident))
        assert len(evicted) == len(admitted), "a re-placement keeps the layer's number of GPU experts"
        return evicted, admitted


def device_copy_s(cost: object) -> float:
    """GPU time of one expert's device-to-device copy: read and write its bytes, plus the per-expert
    overhead (the cost model's ``gpu_mem`` and ``gpu_fixed``; 0 for a model without them)."""
    return 2.0 * float(getattr(cost, "gpu_mem", 0.0)) + float(getattr(cost, "gpu_fixed", 0.0))
