"""Reuse-rate eviction: rank experts by a decayed estimate of how often a token activates them.

Per layer, ``f[E]`` is an exponential moving average of the activation indicator, one update per token
(row), prefill included::

    f <- d * f            for every expert of the layer, d = 0.5 ** (1 / half_life)
    f[e] += (1 - d)       for each expert e the row activated (its top-k)

so ``f[e]`` estimates the probability that the next token activates ``e`` at this layer, with a memory
of about ``half_life`` tokens. Unlike MRS it ignores routing weights (a weight-0.1 activation costs as
much to serve as a weight-0.9 one), and its memory is long enough to survive a prompt's burst. The
value estimate feeds the ``expected-reuse`` admission rule: ``f * horizon`` is the expected number of
activations during a residency. ``victim`` = lowest f, ties by id; ``score`` = f.
"""

from __future__ import annotations

import numpy as np

from hybrimoe_kt.core.eviction._common import RateRanked, check_dims, step_layers
from hybrimoe_kt.core.types import LayerRouting


class ReuseRate(RateRanked):
    name = "reuse"

    def __init__(self, n_layers: int, n_experts: int, half_life: float = 32.0) -> None:
        self.n_layers, self.n_experts = check_dims(n_layers, n_experts)
        if not half_life > 0:
            raise ValueError(f"half_life must be > 0 tokens, got {half_life!r}")
        self.half_life = float(half_life)
        self.decay = 0.5 ** (1.0 / self.half_life)
        self.rate = np.zeros((self.n_layers, self.n_experts), dtype=np.float64)  # [L, E]

    def on_route(self, routing: LayerRouting) -> None:
        layer, d = routing.layer, self.decay
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"routing layer {layer} out of range 0..{self.n_layers - 1}")
        row = self.rate[layer]
        n = routing.n_rows
        if n == 1:
            row *= d
            for e in routing.experts:
                row[e] += 1.0 - d
            return
        ids = np.asarray(routing.topk_ids)
        if routing.top_k:
            ids = ids[:, : routing.top_k]  # [N, K] the experts that ran
        weights = (1.0 - d) * d ** np.arange(n - 1, -1, -1, dtype=np.float64)  # [N]
        w = np.broadcast_to(weights[:, None], ids.shape)
        ok = ids >= 0
        if ok.any() and int(ids[ok].max()) >= self.n_experts:
            raise ValueError(f"routing at layer {layer} names expert {int(ids[ok].max())}, "
                             f"but the model has {self.n_experts} experts")
        row *= d ** n
        np.add.at(row, ids[ok], w[ok])

    def on_step(self, step) -> None:
        """A whole forward at every layer at once (``core.upkeep.StepRouting``): per layer, the same
        update as ``on_route`` on its rows, vectorized over [layers, experts]."""
        ids = np.asarray(step.ran)  # [L, N, K]
        layer = step_layers(ids, self.n_layers, self.n_experts)
        n = ids.shape[1]
        if n == 0:
            return
        ok = ids >= 0
        d = self.decay
        w = np.broadcast_to(((1.0 - d) * d ** np.arange(n - 1, -1, -1, dtype=np.float64))[None, :, None],
                            ids.shape)
        self.rate *= d ** n
        np.add.at(self.rate, (layer[ok], ids[ok]), w[ok])
