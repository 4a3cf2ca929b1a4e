"""Online prediction of which experts a later layer will activate, from routing seen so far.

Three signals, each learned while the model runs (no look at the future):
- inter-layer affinity: how often expert b of layer l+1 followed expert a of layer l (decayed counts);
- temporal reuse: the experts the previous forward activated at the same layer;
- popularity: a decayed activation frequency per layer.
``predict`` mixes them into a probability-like vector per expert whose sum is about top_k.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from hybrimoe_kt.core.types import LayerRouting

_SCALAR_POP = 16    # up to this many experts a Python loop beats numpy's fancy indexing
_SCALAR_TRANS = 32  # the same for (from, to) cells of the transition counts


class RoutingPredictor:
    def __init__(self, n_layers: int, n_experts: int, top_k: int,
                 weights: Sequence[float] = (0.45, 0.35, 0.20), decay: float = 0.98) -> None:
        if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"predictor weights must be 3 non-negative numbers, got {weights}")
        self.n_layers, self.n_experts, self.top_k = n_layers, n_experts, top_k
        w = np.asarray(weights, dtype=np.float64)
        self.w_affinity, self.w_reuse, self.w_pop = (w / w.sum()).tolist()
        self.decay = decay
        self._trans = np.zeros((n_layers, n_experts, n_experts))  # [L, E_from, E_to] into layer l+1
        self._pop = np.zeros((n_layers, n_experts))
        self._last: list[tuple[int, ...]] = [() for _ in range(n_layers)]
        self._last_w: list[tuple[int, ...]] = [() for _ in range(n_layers)]
        self._prev_layer: int | None = None

    def observe(self, routing: LayerRouting) -> None:
        l, ex, tok = routing.layer, routing.experts, routing.tokens
        if not ex:
            return
        pop = self._pop[l]
        pop *= self.decay
        idx = list(ex)
        rows = max(1, routing.n_rows)
        # Same float operations either way; numpy fancy indexing pays off beyond a few experts (ids
        # in a routing are distinct, so each cell is updated once).
        if len(idx) <= _SCALAR_POP:
            for e, n in zip(idx, tok):
                pop[e] += n / rows
        else:
            pop[idx] += np.asarray(tok, dtype=np.int64) / rows
        prev = (l - 1) % self.n_layers
        src = self._last[prev]
        if self._prev_layer == prev and src:
            t = self._trans[prev]
            if len(src) * len(idx) <= _SCALAR_TRANS:
                for a in src:
                    ta = t[a]
                    ta *= self.decay
                    for b in idx:
                        ta[b] += 1.0
            else:
                rows_a = list(src)
                t[rows_a] *= self.decay
                t[np.ix_(rows_a, idx)] += 1.0
        self._last[l] = ex
        self._prev_layer = l

    def predict(self, layer: int) -> np.ndarray:
        """Expected activations of each expert at ``layer`` in the next forward that reaches it. [E]"""
        k = self.top_k
        p = np.zeros(self.n_experts)
        prev = (layer - 1) % self.n_layers
        src = self._last[prev]
        if src and self.w_affinity:
            row = self._trans[prev][list(src)].sum(axis=0)
            s = row.sum()
            if s > 0:
                p += self.w_affinity * k * row / s
        if self._last[layer] and self.w_reuse:
            p[list(self._last[layer])] += self.w_reuse * k / len(self._last[layer])
        pop = self._pop[layer]
        s = pop.sum()
        if s > 0 and self.w_pop:
            p += self.w_pop * k * pop / s
        return p
