"""The classic kTransformers host: HybriMoE's routed experts as a kTransformers experts operator.

Rule files in ``optimize_rules/classic/`` replace each MoE block's ``experts`` module with
``hybrimoe_kt.kt.classic.KHybriMoEExperts`` and leave everything else to kTransformers' own operators;
``python -m ktransformers.local_chat --optimize_config_path <file>`` then runs the model with the
hybrid runtime. The operator class subclasses kTransformers' ``BaseInjectedModule`` and
``KExpertsBase``, so it is built the first time the name is looked up (``operator.operator_class``):
importing this package needs no ``ktransformers``; looking the name up without it raises
``host.ClassicHostMissing`` (one line saying the classic host is needed).

Parts: ``host`` (finding kT), ``settings`` (rule kwargs), ``gguf_read`` (experts from kT's GGUF
loader), ``preset`` (the cost model from kT's config), ``registry`` (the runtime the operators of a
model share), ``operator`` (the operator).
"""

from __future__ import annotations

from typing import Any

__all__ = ["KHybriMoEExperts"]


def __getattr__(name: str) -> Any:
    if name == "KHybriMoEExperts":
        from hybrimoe_kt.kt.classic.operator import operator_class

        return operator_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
