"""The simulator's model of a hidden-state expert predictor, of a stated accuracy.

A real predictor runs layer l+1's router on layer l's hidden state (``HybridMoE.set_next_router``);
a routing trace holds no hidden states, so the simulator models one instead: for the layer l+1 about
to run, each of its truly activated experts appears in the hint with probability ``accuracy``,
otherwise its place holds a wrong expert drawn uniformly (without repeats) from the layer's
non-activated experts (dropped when none is left). The hint keeps the routing's order (most tokens
first) and is given while layer l is decided, as the real hook's prediction is known during layer l.
Only the next layer of the same forward is hinted (a forward's last layer has no next router).

Randomness: one seeded ``numpy.random.Generator`` per replayed fold, from ``(seed, crc32(fold name))``,
so a run is a pure function of its inputs and the seed.

``gate_cost_s`` is the time charged per layer call for running the predictor (see its docstring).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Callable, Optional

import numpy as np

from hybrimoe_kt.core.hardware import HardwareProfile
from hybrimoe_kt.core.models import ModelPreset
from hybrimoe_kt.core.prefetch.hidden import HiddenPrefetch
from hybrimoe_kt.core.protocols import CacheView, Clock
from hybrimoe_kt.core.strategies import Policies
from hybrimoe_kt.core.types import ExpertId, LayerRouting
from hybrimoe_kt.sim.folds import Fold

# host-side Python of the runtime hook per layer call (the predictor call, its ids to numpy, the hint),
# measured on the machine of results/host-this-machine.json; scaled by each profile's host.scale
HOOK_HOST_US = 30.0
GATE_LAUNCHES = 2  # the router GEMV and the top-k of its logits (kt.hidden_hook): one GPU launch each


def modelled_hint(routing: LayerRouting, accuracy: float, n_experts: int,
                  rng: np.random.Generator) -> tuple[int, ...]:
    """The hint of a predictor of ``accuracy`` for ``routing`` (module docstring)."""
    true = routing.experts
    keep = rng.random(len(true)) < accuracy
    n_wrong = int(len(true) - keep.sum())
    wrong: list[int] = []
    if n_wrong:
        active = set(true)
        pool = np.array([e for e in range(n_experts) if e not in active], dtype=np.int64)
        if len(pool):
            wrong = rng.choice(pool, size=min(n_wrong, len(pool)), replace=False).tolist()
    out, j = [], 0
    for e, k in zip(true, keep):
        if k:
            out.append(e)
        elif j < len(wrong):
            out.append(int(wrong[j]))
            j += 1
    return tuple(out)


def fold_rng(seed: int, fold_name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(fold_name.encode())])


class ModelledHints:
    """A ``HiddenPrefetch`` fed modelled hints: when the controller observes layer l (during its
    decision, before the background copies are proposed), the hint for the next layer is given."""

    def __init__(self, inner: HiddenPrefetch, future: Callable[[int], Optional[LayerRouting]], clock: Clock,
                 accuracy: float, n_experts: int, rng: np.random.Generator) -> None:
        if not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"predictor accuracy must be in [0, 1], got {accuracy}")
        self.inner, self.future, self.clock = inner, future, clock
        self.accuracy, self.n_experts, self.rng = accuracy, n_experts, rng
        self.name = inner.name
        self.true_hinted = 0   # hinted experts the next layer then used
        self.activated = 0     # activated experts of the hinted layers

    def observe(self, routing: LayerRouting) -> None:
        self.inner.observe(routing)
        nxt = self.future(self.clock.now + 1)
        if nxt is None or nxt.layer != routing.layer + 1:
            return
        hint = modelled_hint(nxt, self.accuracy, self.n_experts, self.rng)
        self.true_hinted += len(set(hint) & set(nxt.experts))
        self.activated += len(nxt.experts)
        self.inner.hint(nxt.layer, hint)

    def propose(self, layer: int, view: CacheView, budget_s: float) -> list[ExpertId]:
        return self.inner.propose(layer, view, budget_s)

    def expected_uses(self, eid: ExpertId) -> float:
        return self.inner.expected_uses(eid)


def gate_cost_s(profile: HardwareProfile, model: ModelPreset, rows: int = 1,
                hook_host_us: float = HOOK_HOST_US) -> float:
    """Seconds per layer call of running layer l+1's router on layer l's hidden state, charged as
    critical host time (it delays the layer in full): ``GATE_LAUNCHES`` GPU launches at the profile's
    ``gpu.call_overhead_us`` plus the GEMV's roofline (``[rows, hidden] x [hidden, E]`` bf16: weight
    bytes over GPU bandwidth or flops over GPU throughput), one more device-to-host copy of the predicted
    ids (``pcie.latency_us``: the layer's routing is already on the host when the prediction is ready),
    and the hook's host-side Python (``hook_host_us`` x the profile's ``host.scale``)."""
    gpu = profile.gpu
    weight_bytes = 2.0 * model.hidden * model.n_experts
    flops = 2.0 * rows * model.hidden * model.n_experts
    gemv = max(weight_bytes / (gpu.mem_bw_gbs * 1e9), flops / (gpu.tflops * 1e12))
    scale = profile.host.scale if profile.host is not None else 1.0
    return (GATE_LAUNCHES * gpu.call_overhead_us * 1e-6 + gemv + profile.pcie.latency_us * 1e-6
            + hook_host_us * scale * 1e-6)


def with_modelled_hints(pol: Policies, fold: Fold, clock: Clock, n_experts: int) -> Policies:
    """``pol`` with its ``HiddenPrefetch`` fed by the modelled predictor of ``pol.spec.hidden_accuracy``."""
    spec = pol.spec
    if spec.hidden_accuracy is None or not isinstance(pol.prefetcher, HiddenPrefetch):
        raise ValueError(f"strategy {spec.name}: the simulator models hidden-state hints; set "
                         f"hidden_accuracy (in [0, 1]) on a strategy with prefetch 'hidden'")
    hints = ModelledHints(pol.prefetcher, fold.future, clock, spec.hidden_accuracy, n_experts,
                          fold_rng(spec.hidden_seed, fold.name))
    return dataclasses.replace(pol, prefetcher=hints)
