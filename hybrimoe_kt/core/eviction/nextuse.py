"""Next-use eviction: rank experts by their predicted time to next use, from the routing history alone.

Per (layer, expert) the policy keeps the token of its last use and an exponential moving average of
its reuse distance (tokens between consecutive uses at that layer). Tokens are counted per layer, one
per routed row, so a prefill chunk of N rows advances its layer by N. The predicted wait until the next
use of an expert last used ``e`` tokens ago, with mean reuse distance ``g``, is::

    wait = max(g, e)     # memoryless while fresh; once stale (e > g) the wait grows with the staleness

and ``value = 1 / wait`` is read as the expected activations per token (so ``value * horizon`` is the
expected hits over a residency of ``horizon`` tokens, as the step upkeep and the ``expected-reuse``
admission rule price a copy). An expert never used has value 0. ``victim`` = lowest value (the latest
predicted next use), ties by ``(layer, expert)``; admission through ``plan_swaps`` or
``better-than-victim`` refuses a newcomer whose predicted next use is later than its victim's.

``rate`` is recomputed from the arrays on every read (a [L, E] numpy expression), so the staleness is
always that of the current token. The reuse-distance prior for an expert seen once is
``n_experts / top_k`` (uniform routing's mean distance).
"""

from __future__ import annotations

import numpy as np

from hybrimoe_kt.core.eviction._common import RateRanked, check_dims, step_layers
from hybrimoe_kt.core.types import LayerRouting


class NextUse(RateRanked):
    name = "nextuse"

    def __init__(self, n_layers: int, n_experts: int, top_k: int = 1, beta: float = 0.3) -> None:
        self.n_layers, self.n_experts = check_dims(n_layers, n_experts)
        if int(top_k) != top_k or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
        if not 0.0 < float(beta) <= 1.0:
            raise ValueError(f"beta (weight of the newest reuse distance) must be in (0, 1], got {beta!r}")
        self.beta = float(beta)
        self.prior = max(1.0, self.n_experts / int(top_k))
        self.tok = np.zeros(self.n_layers, dtype=np.int64)                          # [L] tokens seen
        self.last = np.full((self.n_layers, self.n_experts), -1, dtype=np.int64)    # [L, E] -1 = never
        self.gap = np.full((self.n_layers, self.n_experts), self.prior)             # [L, E] tokens

    # --- learning ------------------------------------------------------------------------------
    def _update(self, layers, used: np.ndarray) -> None:
        """``used`` [n, N, E] bool: rows (tokens, in order) that activated each expert of ``layers``
        (an index array or a slice)."""
        n_rows = used.shape[1]
        if n_rows == 0:
            return
        count = used.sum(axis=1)                                   # [n, E]
        hit = count > 0
        first = np.argmax(used, axis=1)                            # [n, E] first row of use
        final = n_rows - 1 - np.argmax(used[:, ::-1], axis=1)      # [n, E] last row of use
        t0 = self.tok[layers][:, None]                             # [n, 1]
        last, gap = self.last[layers], self.gap[layers]            # read only: results are written back
        seen = hit & (last >= 0)
        b = self.beta
        gap = np.where(seen, (1 - b) * gap + b * (t0 + first - last), gap)
        inner = count > 1                                          # distances inside the chunk
        w = 1.0 - (1.0 - b) ** np.maximum(count - 1, 0)
        mean_inner = (final - first) / np.maximum(count - 1, 1)
        gap = np.where(inner, (1 - w) * gap + w * mean_inner, gap)
        self.gap[layers] = np.maximum(gap, 1.0)
        self.last[layers] = np.where(hit, t0 + final, last)
        self.tok[layers] += n_rows

    def on_route(self, routing: LayerRouting) -> None:
        layer = routing.layer
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"routing layer {layer} out of range 0..{self.n_layers - 1}")
        ids = np.asarray(routing.topk_ids)
        if routing.top_k:
            ids = ids[:, : routing.top_k]                          # [N, K] the experts that ran
        ok = ids >= 0
        if ok.any() and int(ids[ok].max()) >= self.n_experts:
            raise ValueError(f"routing at layer {layer} names expert {int(ids[ok].max())}, "
                             f"but the model has {self.n_experts} experts")
        used = np.zeros((1, ids.shape[0], self.n_experts), dtype=bool)
        rows = np.broadcast_to(np.arange(ids.shape[0])[:, None], ids.shape)
        used[0, rows[ok], ids[ok]] = True
        self._update(np.array([layer]), used)

    def on_step(self, step) -> None:
        """A whole forward at every layer at once (``core.upkeep.StepRouting``), vectorized."""
        ids = np.asarray(step.ran)                                 # [L, N, K]
        layer = step_layers(ids, self.n_layers, self.n_experts)
        ok = ids >= 0
        used = np.zeros((self.n_layers, ids.shape[1], self.n_experts), dtype=bool)
        rows = np.broadcast_to(np.arange(ids.shape[1])[None, :, None], ids.shape)
        used[layer[ok], rows[ok], ids[ok]] = True
        self._update(slice(None), used)

    # --- ranking -------------------------------------------------------------------------------
    @property
    def rate(self) -> np.ndarray:
        """[L, E] expected activations per token: 1 / predicted wait (0 for experts never used)."""
        return self._rate_rows(0, self.n_layers)

    def _rate_rows(self, first: int, n: int) -> np.ndarray:
        rows = slice(first, first + n)
        last = self.last[rows]
        stale = (self.tok[rows, None] - last).astype(np.float64)   # [n, E] tokens since the last use
        wait = np.maximum(self.gap[rows], stale)
        return np.where(last >= 0, 1.0 / wait, 0.0)

    def predicted_wait(self) -> np.ndarray:
        """[L, E] predicted tokens until the next use (inf for experts never used)."""
        r = self.rate
        return np.where(r > 0, 1.0 / np.where(r > 0, r, 1.0), np.inf)
