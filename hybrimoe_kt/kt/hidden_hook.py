"""kTransformers side of the hidden-state predictor hook: each MoE layer's predictor is the next MoE
block's own router (``families.route``: the family's softmax or sigmoid scoring, grouped top-k, bias),
run on this layer's input hidden state (``HybridMoE.set_next_router``, ``runtime.next_router``).

Wired for every family the block operator (``HybriMoEBlock``) or the experts operator
(``HybriMoEExperts``, whose parent module is the family's MoE block) replaces: ``route`` reads the
router by the family's attribute names, so no family needs its own code. ``attach_runtime`` calls
``attach_next_routers`` when the strategy prefetches with ``hidden`` (rule kwarg ``prefetch: hidden``
on a per-layer strategy such as ``hybrimoe-layer``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from hybrimoe_kt.kt.families import FamilySpec, block_spec, route
from hybrimoe_kt.runtime.next_router import NextRouter


def next_router_fn(block: Any, spec: FamilySpec) -> NextRouter:
    """``x [N, H] -> ids [N, k]``: ``block``'s router on ``x`` (the ids only; no gradient)."""

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return route(block, x, spec)[0]

    return predict


def router_block(model: torch.nn.Module, op: Any) -> tuple[Any, FamilySpec]:
    """The module holding ``op``'s router and its family: the block operator itself, or the experts
    operator's parent MoE block."""
    family = getattr(op, "family", None)
    if family is not None:  # HybriMoEBlock: the family's router sits on the operator
        return op, family
    parent = model.get_submodule(op.key.rsplit(".", 1)[0])
    return parent, block_spec(parent)


def attach_next_routers(model: torch.nn.Module, ops: Sequence[Any], runtime: Any) -> int:
    """Register, for every MoE layer but the last, the next MoE layer's router as its predictor
    (``ops`` in layer order, ``op.moe_index`` set). Returns how many were registered."""
    n = 0
    for op, nxt in zip(ops, ops[1:]):
        block, spec = router_block(model, nxt)
        runtime.set_next_router(op.moe_index, next_router_fn(block, spec))
        n += 1
    return n
