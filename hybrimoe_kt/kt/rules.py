"""Optimize rules: a YAML list that says which modules of a model are replaced by which operators.

Schema (the kTransformers optimize-rule format)::

    - match:                       # required; at least one of name / class
        name: "^model\\.layers\\.\\d+\\.mlp$"   # regex, re.search on the dotted module name
        class: transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock  # isinstance
      replace:                     # optional, see below
        class: pkg.module.Operator # dotted path of an nn.Module operator, or "default"
        kwargs: {prefill_device: cuda, generate_device: cpu, ...}   # optional mapping
      recursive: false             # optional bool, default true

Supported:

- ``match.name`` and ``match.class`` together: a module matches only when both hold.
- ``replace.class`` importable by dotted path from any installed package; it must be an
  ``nn.Module`` subclass following the operator contract (see ``hybrimoe_kt.kt.contract``).
- ``replace.class: default`` keeps the module and records its kwargs; only ``prefill_device`` and
  ``generate_device`` are accepted there.
- A rule without ``replace`` keeps the matched module unchanged, like ``class: default`` without
  kwargs. With ``recursive: false`` it shields the module's subtree from later rules.

Rejected (``RuleError`` naming the file, the rule's index and text, and the problem): a file that is
not a YAML list of mappings or is empty; unknown keys at any level; a rule without ``match`` or with an
empty ``match``; a regex that does not compile; a class path that cannot be imported (missing module
or attribute) or is not a class; a replace class that is not an ``nn.Module`` or breaks the operator
contract; ``kwargs`` that is not a mapping with string keys; kwargs the operator does not accept,
kwargs the engine supplies itself (``key``, ``gguf_loader``, ``config``, ``orig_module``) and missing
required kwargs; a non-boolean ``recursive``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from hybrimoe_kt.kt.contract import check_kwargs
from hybrimoe_kt.kt.imports import import_class

log = logging.getLogger(__name__)

DEFAULT = "default"
RULE_KEYS = frozenset({"match", "replace", "recursive"})
MATCH_KEYS = frozenset({"name", "class"})
REPLACE_KEYS = frozenset({"class", "kwargs"})
TEXT_LIMIT = 100


class RuleError(ValueError):
    """A rule file or rule is invalid, or a rule matched nothing in strict mode."""


@dataclass(frozen=True)
class Rule:
    """One validated rule. ``replace_class`` None means the matched module is kept."""

    index: int
    text: str  # the rule's YAML, on one line, shortened
    source: str  # the file it came from
    name_pattern: re.Pattern[str] | None
    match_class: type | None
    match_class_path: str | None
    replace_class: type | None
    replace_class_path: str  # dotted path, or "default"
    kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    recursive: bool = True

    def matches(self, name: str, module: object) -> bool:
        if self.name_pattern is not None and self.name_pattern.search(name) is None:
            return False
        return self.match_class is None or isinstance(module, self.match_class)

    @property
    def keeps(self) -> bool:
        return self.replace_class is None

    def where(self) -> str:
        return f"{self.source}: rule {self.index} ({self.text})"


def _short_text(raw: object) -> str:
    import yaml

    try:
        text = yaml.safe_dump(raw, default_flow_style=True, sort_keys=False, width=10**6).strip()
    except yaml.YAMLError:
        text = repr(raw)
    text = text.removesuffix("...").strip()
    return text if len(text) <= TEXT_LIMIT else text[: TEXT_LIMIT - 3] + "..."


def _check_keys(raw: Mapping[Any, Any], allowed: frozenset[str], what: str) -> None:
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {what}; allowed: {sorted(allowed)}")


def _parse_rule(raw: object, index: int, source: str) -> Rule:
    if not isinstance(raw, Mapping):
        raise ValueError(f"a rule must be a mapping with keys {sorted(RULE_KEYS)}, "
                         f"got a {type(raw).__name__}")
    _check_keys(raw, RULE_KEYS, "the rule")
    if "match" not in raw:
        raise ValueError("no 'match' key; add match: {name: REGEX} and/or match: {class: DOTTED.PATH}")
    match = raw["match"]
    if not isinstance(match, Mapping):
        raise ValueError(f"'match' must be a mapping, got {match!r}")
    _check_keys(match, MATCH_KEYS, "'match'")
    if not match:
        raise ValueError("'match' is empty; give at least one of 'name' (regex) or 'class'")
    pattern = None
    if "name" in match:
        if not isinstance(match["name"], str):
            raise ValueError(f"match.name must be a regex string, got {match['name']!r}")
        try:
            pattern = re.compile(match["name"])
        except re.error as e:
            raise ValueError(f"match.name {match['name']!r} is not a valid regex: {e}") from e
    match_cls, match_path = None, None
    if "class" in match:
        match_path = match["class"]
        try:
            match_cls = import_class(match_path)
        except ValueError as e:
            raise ValueError(f"match.class: {e}") from e
    replace = raw.get("replace")
    replace_cls, replace_path, kwargs = None, DEFAULT, {}
    if replace is not None:
        if not isinstance(replace, Mapping):
            raise ValueError(f"'replace' must be a mapping with keys {sorted(REPLACE_KEYS)}, "
                             f"got {replace!r}")
        _check_keys(replace, REPLACE_KEYS, "'replace'")
        if "class" not in replace:
            raise ValueError("'replace' has no 'class'; give a dotted operator path or 'default'")
        replace_path = replace["class"]
        if replace_path != DEFAULT:
            try:
                replace_cls = import_class(replace_path)
            except ValueError as e:
                raise ValueError(f"replace.class: {e}") from e
            import torch

            if not issubclass(replace_cls, torch.nn.Module):
                raise ValueError(f"replace.class {replace_path!r} is not a torch.nn.Module subclass")
        kwargs = replace.get("kwargs")
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
            raise ValueError(f"replace.kwargs must be a mapping of names to values, got {kwargs!r}")
        check_kwargs(replace_cls, kwargs)
    recursive = raw.get("recursive", True)
    if not isinstance(recursive, bool):
        raise ValueError(f"'recursive' must be true or false, got {recursive!r}")
    return Rule(index=index, text=_short_text(raw), source=source, name_pattern=pattern,
                match_class=match_cls, match_class_path=match_path, replace_class=replace_cls,
                replace_class_path=replace_path, kwargs=MappingProxyType(dict(kwargs)),
                recursive=recursive)


def parse_rules(data: object, source: str = "<rules>") -> list[Rule]:
    """Validate already-parsed YAML ``data`` (a list of rule mappings)."""
    if data is None:
        raise RuleError(f"{source}: the rules file is empty; expected a YAML list of rules")
    if not isinstance(data, list):
        raise RuleError(f"{source}: expected a YAML list of rules (lines starting with '- match:'), "
                        f"got a {type(data).__name__}")
    if not data:
        raise RuleError(f"{source}: the list of rules is empty")
    rules = []
    for i, raw in enumerate(data):
        try:
            rules.append(_parse_rule(raw, i, source))
        except ValueError as e:
            raise RuleError(f"{source}: rule {i} ({_short_text(raw)}): {e}") from e
    log.debug("%s: %d rules", source, len(rules))
    return rules


def load_rules(path: str | Path) -> list[Rule]:
    """Read and validate a YAML rules file. Raises RuleError (a ValueError) on any problem."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise RuleError(f"rules file {path} does not exist") from e
    except (OSError, UnicodeDecodeError) as e:
        raise RuleError(f"rules file {path} cannot be read: {e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RuleError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from e
    return parse_rules(data, str(path))
