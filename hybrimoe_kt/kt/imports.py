"""Import a class from a dotted path such as ``torch.nn.Linear`` or ``pkg.module.Outer.Inner``."""

from __future__ import annotations

import importlib


def import_dotted(path: str) -> object:
    """The object at ``path``. The longest importable module prefix is imported and the rest is read
    as attributes. Raises ValueError naming the path and the missing module or attribute."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"class path {path!r} must be a non-empty string like 'package.module.Class'")
    parts = path.split(".")
    if len(parts) < 2 or not all(p.isidentifier() for p in parts):
        raise ValueError(f"class path {path!r} is not a dotted path like 'package.module.Class'")
    module = None
    split = 0
    for i in range(len(parts) - 1, 0, -1):
        mod_name = ".".join(parts[:i])
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            missing = e.name or ""
            if missing == mod_name or mod_name.startswith(missing + "."):
                continue  # this prefix is not a module: try a shorter one
            raise ValueError(f"class path {path!r}: importing module {mod_name!r} failed: {e}") from e
        except Exception as e:  # a module that exists but fails while importing
            raise ValueError(f"class path {path!r}: importing module {mod_name!r} failed: "
                             f"{type(e).__name__}: {e}") from e
        split = i
        break
    if module is None:
        raise ValueError(f"class path {path!r}: no module named {parts[0]!r} "
                         f"(is the package installed and the name spelled right?)")
    obj: object = module
    for j in range(split, len(parts)):
        if not hasattr(obj, parts[j]):
            owner = ".".join(parts[:j])
            raise ValueError(f"class path {path!r}: {owner!r} has no attribute {parts[j]!r}")
        obj = getattr(obj, parts[j])
    return obj


def import_class(path: str) -> type:
    """Like :func:`import_dotted`, but the object must be a class."""
    obj = import_dotted(path)
    if not isinstance(obj, type):
        raise ValueError(f"class path {path!r} names a {type(obj).__name__}, not a class")
    return obj
