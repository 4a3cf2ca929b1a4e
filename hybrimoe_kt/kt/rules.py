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

Classic kTransformers rule files (``optimize_rules/classic/``) name ``ktransformers.*`` classes and this
package's classic operator (``hybrimoe_kt.kt.classic.*``), which import only where classic kTransformers
is installed. Where it is not, ``parse_rules`` raises ``ClassicHostNeeded`` (a ``RuleError``: one line
listing those classes and pointing to ``python -m ktransformers.local_chat`` and
``optimize_rules/classic/``) before importing anything. ``parse_rules(..., skip_classic=True)`` checks
such a file's schema without importing them; ``hybrimoe_kt.kt.classic.check.classic_report`` builds the
warning-level ``rules check`` report on it.
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
CLASSIC_PREFIXES = ("ktransformers.", "hybrimoe_kt.kt.classic.")
CLASSIC_RULES = "optimize_rules/classic/"
RULE_KEYS = frozenset({"match", "replace", "recursive"})
MATCH_KEYS = frozenset({"name", "class"})
REPLACE_KEYS = frozenset({"class", "kwargs"})
TEXT_LIMIT = 100


class RuleError(ValueError):
    """A rule file or rule is invalid, or a rule matched nothing in strict mode."""


class ClassicHostNeeded(RuleError):
    """A classic kTransformers rule file, read where classic kTransformers is not installed."""

    def __init__(self, source: str, classes: list[str]) -> None:
        self.source, self.classes = source, classes
        super().__init__(f"{source} is a classic kTransformers rule file: {len(classes)} class(es) need the "
                         f"classic host (the ktransformers package, not importable here): {', '.join(classes)}; "
                         f"run it with python -m ktransformers.local_chat --optimize_config_path {source} "
                         f"(rule files for that host: {CLASSIC_RULES}); this package's own host takes "
                         f"optimize_rules/<Family>-hybrimoe.yaml")


def is_classic(path: object) -> bool:
    """Whether a class path needs the classic kTransformers host."""
    return isinstance(path, str) and path.startswith(CLASSIC_PREFIXES)


def classic_classes(data: object) -> list[str]:
    """The class paths of parsed rule YAML ``data`` that need the classic host, sorted, once each."""
    found = set()
    for raw in data if isinstance(data, list) else []:
        for part in ("match", "replace"):
            sub = raw.get(part) if isinstance(raw, Mapping) else None
            if isinstance(sub, Mapping) and is_classic(sub.get("class")):
                found.add(sub["class"])
    return sorted(found)


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


def _parse_rule(raw: object, index: int, source: str, skip_classic: bool = False) -> Rule:
    """One rule; ``skip_classic``: classic class paths are not imported (their kwargs are checked only
    for this package's classic operator, whose accepted names are known without kTransformers)."""
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
    if "class" in match and skip_classic and is_classic(match["class"]):
        match_path = match["class"]
    elif "class" in match:
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
        if skip_classic and is_classic(replace_path):
            pass
        elif replace_path != DEFAULT:
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
        if not (skip_classic and is_classic(replace_path)):
            check_kwargs(replace_cls, kwargs)
        elif replace_path.startswith("hybrimoe_kt."):
            _check_classic_kwargs(replace_path, kwargs)
    recursive = raw.get("recursive", True)
    if not isinstance(recursive, bool):
        raise ValueError(f"'recursive' must be true or false, got {recursive!r}")
    return Rule(index=index, text=_short_text(raw), source=source, name_pattern=pattern,
                match_class=match_cls, match_class_path=match_path, replace_class=replace_cls,
                replace_class_path=replace_path, kwargs=MappingProxyType(dict(kwargs)),
                recursive=recursive)


def _check_classic_kwargs(path: str, kwargs: Mapping[str, Any]) -> None:
    from hybrimoe_kt.kt.classic.settings import KWARGS, OPERATOR_PATH
    from hybrimoe_kt.kt.contract import DEVICE_KWARGS, ENGINE_ARGS

    if path != OPERATOR_PATH:
        raise ValueError(f"replace.class {path!r}: hybrimoe_kt.kt.classic has no such operator; use "
                         f"{OPERATOR_PATH}")
    engine = sorted(set(kwargs) & set(ENGINE_ARGS))
    if engine:
        raise ValueError(f"kwargs {engine} are supplied by the engine; remove them from the rule")
    unknown = sorted(set(kwargs) - KWARGS - DEVICE_KWARGS)
    if unknown:
        raise ValueError(f"unknown kwargs {unknown} for operator {path}; accepted: "
                         f"{sorted(KWARGS | DEVICE_KWARGS)}")


def parse_rules(data: object, source: str = "<rules>", *, skip_classic: bool = False) -> list[Rule]:
    """Validate already-parsed YAML ``data`` (a list of rule mappings). A classic kTransformers rule
    file where classic kTransformers is not installed raises ``ClassicHostNeeded``; ``skip_classic``
    checks it without importing its classic classes instead (the rules it returns then leave those
    classes out: for reports, not for injection)."""
    from hybrimoe_kt.kt.classic import host

    if data is None:
        raise RuleError(f"{source}: the rules file is empty; expected a YAML list of rules")
    if not isinstance(data, list):
        raise RuleError(f"{source}: expected a YAML list of rules (lines starting with '- match:'), "
                        f"got a {type(data).__name__}")
    if not data:
        raise RuleError(f"{source}: the list of rules is empty")
    classic = classic_classes(data)
    if classic and not skip_classic and not host.available():
        raise ClassicHostNeeded(source, classic)
    rules = []
    for i, raw in enumerate(data):
        try:
            rules.append(_parse_rule(raw, i, source, skip_classic))
        except ValueError as e:
            raise RuleError(f"{source}: rule {i} ({_short_text(raw)}): {e}") from e
    log.debug("%s: %d rules", source, len(rules))
    return rules


def read_rules_yaml(path: str | Path) -> object:
    """The parsed YAML of a rules file (RuleError when it cannot be read or parsed)."""
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
    return data


def load_rules(path: str | Path) -> list[Rule]:
    """Read and validate a YAML rules file. Raises RuleError (a ValueError) on any problem."""
    path = Path(path)
    return parse_rules(read_rules_yaml(path), str(path))
