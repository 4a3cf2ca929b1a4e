"""The operator contract and the check of a rule's kwargs against an operator class.

An operator replaces one module of a model. The engine constructs it with keyword arguments::

    Operator(key=<dotted module name>, gguf_loader=..., config=..., orig_module=<the module>,
             prefill_device=..., generate_device=..., **rule_kwargs)

A class declares which extra kwargs it accepts in one of two ways:

- a class attribute ``KWARGS: frozenset[str]`` (takes precedence; use it when ``__init__`` forwards
  ``**kwargs``), or
- an ``__init__`` signature without ``**kwargs``: its keyword parameters are the accepted names.

A signature with ``**kwargs`` and no ``KWARGS`` attribute accepts any name (nothing can be checked).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

ENGINE_ARGS = ("key", "gguf_loader", "config", "orig_module")
DEVICE_KWARGS = frozenset({"prefill_device", "generate_device"})
CONTRACT_ARGS = (*ENGINE_ARGS, "prefill_device", "generate_device")


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def accepted_kwargs(cls: type) -> frozenset[str] | None:
    """The rule kwargs ``cls`` accepts (device kwargs included), or None when any name is accepted.
    Raises ValueError when ``cls`` does not follow the operator contract."""
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError) as e:
        raise ValueError(f"operator {_name(cls)}: cannot read its constructor signature ({e})") from e
    params = sig.parameters
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    keywordable = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = [a for a in CONTRACT_ARGS if a not in keywordable]
    if missing and not has_var_kw:
        raise ValueError(f"operator {_name(cls)} does not follow the operator contract: its constructor "
                         f"lacks keyword parameters {missing}; it must accept "
                         f"({', '.join(CONTRACT_ARGS)}, ...)")
    declared = getattr(cls, "KWARGS", None)
    if declared is not None:
        if not isinstance(declared, (set, frozenset)) or not all(isinstance(k, str) for k in declared):
            raise ValueError(f"operator {_name(cls)}: KWARGS must be a frozenset of names, "
                             f"got {declared!r}")
        return frozenset(declared) | DEVICE_KWARGS
    if has_var_kw:
        return None
    return frozenset(keywordable - set(ENGINE_ARGS))


def required_kwargs(cls: type) -> frozenset[str]:
    """Extra constructor parameters without a default, which every rule must give."""
    params = inspect.signature(cls).parameters
    return frozenset(n for n, p in params.items()
                     if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                     and p.default is p.empty and n not in CONTRACT_ARGS)


def check_kwargs(cls: type | None, kwargs: Mapping[str, Any]) -> None:
    """Raise ValueError when ``kwargs`` cannot be passed to operator ``cls``. ``cls`` None stands for
    ``replace.class: default``, which accepts only the device kwargs."""
    names = set(kwargs)
    engine = sorted(names & set(ENGINE_ARGS))
    if engine:
        raise ValueError(f"kwargs {engine} are supplied by the engine; remove them from the rule")
    if cls is None:
        unknown = sorted(names - DEVICE_KWARGS)
        if unknown:
            raise ValueError(f"unknown kwargs {unknown} for class 'default', which only records device "
                             f"placement; accepted: {sorted(DEVICE_KWARGS)}")
        return
    accepted = accepted_kwargs(cls)
    if accepted is not None:
        unknown = sorted(names - accepted)
        if unknown:
            raise ValueError(f"unknown kwargs {unknown} for operator {_name(cls)}; "
                             f"accepted: {sorted(accepted)}")
    missing = sorted(required_kwargs(cls) - names)
    if missing:
        raise ValueError(f"operator {_name(cls)} requires kwargs {missing} (no default); add them "
                         f"under replace.kwargs")
