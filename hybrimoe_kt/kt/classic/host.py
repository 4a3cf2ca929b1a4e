"""The classic kTransformers framework as the classic adapter sees it: found on demand, never at import.

Classic kTransformers (the ``ktransformers`` package, v0.2.x-v0.4.x, a CUDA build) is the host of the
rule files in ``optimize_rules/classic/``. Nothing here imports it until a function is called, so the
adapter imports on a machine without it; every failure to find what the adapter needs is one line
(``ClassicHostMissing``) that names the missing piece and what to do instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from typing import Optional

log = logging.getLogger(__name__)

PACKAGE = "ktransformers"
RULES_HINT = "optimize_rules/classic/"
INSTEAD = (f"install classic kTransformers (ktransformers v0.2.x-v0.4.x, a CUDA build) and run "
           f"python -m ktransformers.local_chat with a rule file from {RULES_HINT}; on this package's own "
           f"host use optimize_rules/<Family>-hybrimoe.yaml with hybrimoe-kt chat")


class ClassicHostMissing(ImportError):
    """The classic kTransformers framework, or a part of it the adapter needs, cannot be imported."""


def available() -> bool:
    """Whether the ``ktransformers`` package can be found (nothing is imported)."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE] is not None
    try:
        return importlib.util.find_spec(PACKAGE) is not None
    except (ImportError, ValueError):
        return False


def _module(name: str, what: str) -> object:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ClassicHostMissing(f"{what} needs the classic kTransformers host: importing {name} failed "
                                 f"({e}); {INSTEAD}") from e


def _attr(module_name: str, attr: str, what: str) -> type:
    mod = _module(module_name, what)
    obj = getattr(mod, attr, None)
    if not isinstance(obj, type):
        raise ClassicHostMissing(f"{what} needs {module_name}.{attr}, which this ktransformers does not have: "
                                 f"it is not the classic framework (ktransformers 0.5+ is kt-kernel inside "
                                 f"SGLang: use this package's SGLang plugin there); {INSTEAD}")
    return obj


def bases(what: str) -> tuple[type, type]:
    """kTransformers' ``BaseInjectedModule`` and ``KExpertsBase``, the bases of its experts operators."""
    return (_attr("ktransformers.operators.base_operator", "BaseInjectedModule", what),
            _attr("ktransformers.operators.experts", "KExpertsBase", what))


def cpu_infer() -> Optional[int]:
    """kTransformers' CPU thread setting, ``Config().cpu_infer`` (``local_chat --cpu_infer`` sets it
    before the model is built); None when the host or the setting cannot be reached."""
    if not available():
        return None
    try:
        config = importlib.import_module("ktransformers.server.config.config").Config()
        n = int(config.cpu_infer)
    except (ImportError, AttributeError, TypeError, ValueError, OSError) as e:
        log.debug("kTransformers' Config().cpu_infer is not reachable (%s: %s)", type(e).__name__, e)
        return None
    return n if n > 0 else None


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (kTransformers' ``--use_cuda_graph``)."""
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
