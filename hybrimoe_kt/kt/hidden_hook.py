"""kTransformers side of the hidden-state predictor hook: each MoE layer's predictor is the next MoE
block's own router (``families.route``: the family's softmax or sigmoid scoring, grouped top-k, bias),
run on this layer's input hidden state (``HybridMoE.set_next_router``, ``runtime.next_router``).

Wired for every family the block operator (``HybriMoEBlock``) or the experts operator
(``HybriMoEExperts``, whose parent module is the family's MoE block) replaces: ``route`` reads the
router by the family's attribute names, so no family needs its own code. ``attach_runtime`` calls
``attach_next_routers`` when the strategy prefetches with ``hidden`` (rule kwarg ``prefetch: hidden``
on a per-layer strategy such as ``hybrimoe-layer``). The runtime skips the predictor in prefill when the
strategy queues no background copies there (``background_in_prefill``), so only decode pays for it.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from hybrimoe_kt.kt.families import FamilySpec, block_spec, route
from hybrimoe_kt.runtime.next_router import NextRouter


def _plain(block: Any, spec: FamilySpec) -> bool:
    """True when the router's choice is the top-k of its logits: a monotone score (softmax or sigmoid),
    no score correction and no grouped top-k."""
    rs, gate = spec.router, getattr(block, spec.router_attr)
    if rs.bias_attr is not None and getattr(gate, rs.bias_attr, None) is not None:
        return False
    n_group = getattr(gate, "num_group", None)
    return not (rs.groups != "none" and n_group and (
        rs.group_switch is None or getattr(gate, rs.group_switch) == "group_limited_greedy"))


def next_router_fn(block: Any, spec: FamilySpec) -> NextRouter:
    """``x [N, H] -> ids [N, k]``: the experts ``block``'s router chooses for ``x`` (no gradient). A plain
    router (``_plain``) is one GEMV and a top-k of the logits (the same experts, fewer kernels); any other
    runs the family's whole rule (``families.route``)."""
    if not _plain(block, spec):
        def full(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return route(block, x, spec)[0]
        return full
    gate, fp32 = getattr(block, spec.router_attr), spec.router.fp32_logits

    def plain(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            w = gate.weight
            logits = x.float() @ w.float().t() if fp32 else x @ w.to(x.dtype).t()
            return logits.topk(gate.top_k, dim=-1).indices
    return plain


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
