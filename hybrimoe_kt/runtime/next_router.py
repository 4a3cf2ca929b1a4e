"""The runtime's hidden-state predictor hook: layer l+1's router run on layer l's hidden state.

``HybridMoE.set_next_router(layer, fn)`` registers ``fn(x [N, H]) -> ids [N, K]`` (torch, on the GPU
tier) for MoE layer ``layer``: in that layer's per-layer path the runtime launches ``fn`` on the layer's
input hidden state before its routing goes to the host, brings the predicted ids over right after the
routing (one more device-to-host copy), and hands them to the strategy's ``HiddenPrefetch`` as the hint
for layer ``layer + 1`` before the controller decides layer ``layer``; layer ``layer``'s background
copies then prefetch the hinted experts that are not resident (``core.prefetch.hidden``). A prefetch
only changes where an expert runs, never what it computes. In prefill the predictor is skipped when the
strategy queues no background copies there (``StrategySpec.background_in_prefill``; hybrimoe-layer).

Off by default: with no predictor registered the layer call does one attribute check. The step
cadence's decode path (``runtime.step_cadence``) never calls it: strategies with the step cadence
cannot use ``prefetch='hidden'`` (their decode layers make no per-layer copies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

NextRouter = Callable[[torch.Tensor], torch.Tensor]  # x [N, H] -> predicted ids [N, K] of the next layer


@dataclass
class HintStats:
    calls: int = 0           # predictor calls
    hinted: int = 0          # distinct experts hinted, summed over calls
    seconds: float = 0.0     # host time from the predictor's launch to the hint (timer of the runtime)


def hint_order(ids_np: np.ndarray) -> list[int]:
    """The distinct experts of predicted ids ``[N, K]``, most rows first, then by first appearance
    (-1 = none)."""
    flat = ids_np.ravel().tolist()
    if ids_np.shape[0] <= 1:
        return list(dict.fromkeys(e for e in flat if e >= 0))
    count: dict[int, int] = {}
    for e in flat:
        if e >= 0:
            count[e] = count.get(e, 0) + 1
    return sorted(count, key=lambda e: -count[e])  # stable: ties keep first appearance


def check_next_router(spec_name: str, prefetch: str, n_layers: int, layer: int) -> None:
    if prefetch != "hidden":
        raise ValueError(f"strategy {spec_name} prefetches with {prefetch!r}: a next-layer router needs "
                         f"prefetch='hidden' (with_overrides(spec, prefetch='hidden'))")
    if not 0 <= layer < n_layers - 1:
        raise ValueError(f"a next-layer router runs layer l+1's gate during layer l: l must be in "
                         f"0..{n_layers - 2}, got {layer}")
