"""Hidden-state prefetch: copy the experts a *hint* says the next layer will use.

A hidden-state predictor runs layer l+1's router (gate) on layer l's hidden state, so the next layer's
experts are predicted while layer l runs. The prediction needs data a routing trace lacks (the hidden
states), so the hints come from outside through ``hint(layer, experts)``: the runtime's hook
(``HybridMoE.set_next_router``) feeds real predictions; the simulator feeds modelled ones of a stated
accuracy (``sim.hidden``). Torch-free.

``propose(layer, ...)`` returns the hinted experts of layer ``layer + 1`` that are not resident, in
hint order, as many as fit in ``budget_s`` (as ``OraclePrefetch``). ``observe`` scores each hint against
the routing that layer then chose: ``expected_uses`` of a proposed expert is that measured precision
(an exponentially weighted hit fraction with a prior of ``prior`` over ``prior_weight`` hinted experts),
so admission rules price a hint by how often hints have been right, not by a stated accuracy.
"""

from __future__ import annotations

from typing import Iterable

from hybrimoe_kt.core.protocols import CacheView
from hybrimoe_kt.core.types import ExpertId, LayerRouting


class HiddenPrefetch:
    name = "hidden"

    def __init__(self, prior: float = 0.5, prior_weight: float = 2.0, decay: float = 0.995) -> None:
        if not 0.0 <= prior <= 1.0 or prior_weight <= 0 or not 0.0 < decay <= 1.0:
            raise ValueError(f"hidden prefetch needs prior in [0, 1], prior_weight > 0 and decay in (0, 1], "
                             f"got {prior}, {prior_weight}, {decay}")
        self.decay = decay
        self._right = prior * prior_weight   # weighted count of hinted experts the layer then used
        self._hinted = prior_weight          # weighted count of hinted experts
        self._hints: dict[int, tuple[int, ...]] = {}  # layer -> hinted experts (best first)
        self._proposed: set[ExpertId] = set()
        self.hints_given = 0                 # hints received (for stats)

    def hint(self, layer: int, experts: Iterable[int]) -> None:
        """The experts layer ``layer`` is predicted to use, best first (negative ids are skipped); it
        replaces any earlier hint for that layer."""
        seen: dict[int, None] = {}
        for e in experts:
            e = int(e)
            if e >= 0:
                seen.setdefault(e, None)
        self._hints[layer] = tuple(seen)
        self.hints_given += 1

    def hinted(self, layer: int) -> tuple[int, ...]:
        return self._hints.get(layer, ())

    @property
    def precision(self) -> float:
        """The weighted fraction of hinted experts that their layer then used."""
        return self._right / self._hinted

    def observe(self, routing: LayerRouting) -> None:
        hint = self._hints.pop(routing.layer, None)
        if not hint:
            return
        used = set(routing.experts)
        d = self.decay ** len(hint)
        self._right = self._right * d + sum(1 for e in hint if e in used)
        self._hinted = self._hinted * d + len(hint)

    def propose(self, layer: int, view: CacheView, budget_s: float) -> list[ExpertId]:
        self._proposed = set()
        target = layer + 1
        hint = self._hints.get(target)
        if not hint or target >= view.n_layers:
            return []
        per = view.cost.transfer()
        n_max = 1 << 30 if budget_s == float("inf") or per <= 0 else int(budget_s / per)
        res = view.resident(target)
        out = [(target, e) for e in hint if e not in res][:max(0, n_max)]
        self._proposed = set(out)
        return out

    def expected_uses(self, eid: ExpertId) -> float:
        """The measured precision of past hints for an expert of the last proposal (else 0)."""
        return self.precision if eid in self._proposed else 0.0
