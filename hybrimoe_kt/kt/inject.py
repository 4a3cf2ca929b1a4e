"""Apply optimize rules to a model: find the module each rule claims and swap in its operator.

Semantics:

- Modules are visited top-down in ``named_children`` order, starting below the root (the model
  itself is never matched). A module object reachable under two names is visited once, under the
  first, as ``named_modules`` does.
- For each module the FIRST rule that matches wins; later rules never see it.
- ``recursive: true`` (default): the matched module's ORIGINAL children are visited next, whether the
  module is kept or replaced. Children are replaced inside the original module before the parent's
  operator is constructed, so the operator receives (as ``orig_module``) a subtree that is already
  rewritten. Modules created by operators are never visited, so a pass never matches its own output.
- ``recursive: false``: the matched module's children are not visited.
- All matches are resolved before anything is constructed; a strict pass with an unmatched rule
  raises before the model is touched. If an operator's constructor fails, the swaps already made are
  undone and the model is left as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch

from hybrimoe_kt.kt.rules import Rule, RuleError

log = logging.getLogger(__name__)

Action = Literal["replace", "keep"]


@dataclass(frozen=True)
class Injection:
    """One matched module: what the rule did to it."""

    name: str
    rule_index: int
    action: Action
    class_path: str  # the operator for "replace", the module's own class for "keep"
    kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class InjectionReport:
    """The outcome of one pass: matched modules in visiting order and matches per rule."""

    injections: tuple[Injection, ...]
    rules: tuple[Rule, ...]
    counts: tuple[int, ...]  # matches per rule, by rule position
    dry_run: bool = False

    def unmatched(self) -> list[Rule]:
        return [r for r, n in zip(self.rules, self.counts) if n == 0]

    def by_rule(self, position: int) -> list[str]:
        """Names of the modules the rule at ``position`` matched."""
        idx = self.rules[position].index
        return [i.name for i in self.injections if i.rule_index == idx]

    def format(self) -> str:
        head = ("module", "rule", "action", "class", "prefill", "generate")
        rows = [(i.name, str(i.rule_index), i.action + (" (dry run)" if self.dry_run and
                                                        i.action == "replace" else ""),
                 i.class_path, str(i.kwargs.get("prefill_device", "")),
                 str(i.kwargs.get("generate_device", ""))) for i in self.injections]
        widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [head, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append("")
        for rule, n in zip(self.rules, self.counts):
            flag = "" if n else "   <- matched nothing"
            lines.append(f"rule {rule.index}: {n} module(s)  {rule.text}{flag}")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Match:
    name: str
    module: torch.nn.Module
    parent: torch.nn.Module
    child_name: str
    rule: Rule


def _resolve(model: torch.nn.Module, rules: Sequence[Rule]) -> list[_Match]:
    found: list[_Match] = []
    seen: set[int] = {id(model)}

    def visit(module: torch.nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            if id(child) in seen:
                continue
            seen.add(id(child))
            name = f"{prefix}.{child_name}" if prefix else child_name
            rule = next((r for r in rules if r.matches(name, child)), None)
            if rule is not None:
                found.append(_Match(name, child, module, child_name, rule))
            if rule is None or rule.recursive:
                visit(child, name)

    visit(model, "")
    return found


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def apply_rules(model: torch.nn.Module, rules: Sequence[Rule], *, config: Any = None,
                gguf_loader: Any = None, default_device: str = "cpu", strict: bool = True,
                dry_run: bool = False) -> InjectionReport:
    """Replace the modules of ``model`` the rules match, in place (see the module docstring).

    ``dry_run`` resolves matches and reports them without constructing operators or touching the
    model. ``strict`` makes a rule that matched no module an error (RuleError), else a warning."""
    matches = _resolve(model, rules)
    counts = [0] * len(rules)
    position = {id(r): p for p, r in enumerate(rules)}
    for m in matches:
        counts[position[id(m.rule)]] += 1
    unmatched = [r for r, n in zip(rules, counts) if n == 0]
    if unmatched:
        listed = "; ".join(r.where() for r in unmatched)
        if strict:
            raise RuleError(f"{len(unmatched)} rule(s) matched no module: {listed}. Fix the name "
                            f"regex or class (module names: model.named_modules()), or remove them")
        log.warning("%d rule(s) matched no module: %s", len(unmatched), listed)

    injections = []
    for m in matches:
        kwargs = dict(m.rule.kwargs)
        kwargs.setdefault("prefill_device", default_device)
        kwargs.setdefault("generate_device", default_device)
        cls_path = _class_path(type(m.module)) if m.rule.keeps else m.rule.replace_class_path
        injections.append(Injection(m.name, m.rule.index, "keep" if m.rule.keeps else "replace",
                                    cls_path, MappingProxyType(kwargs)))
    report = InjectionReport(tuple(injections), tuple(rules), tuple(counts), dry_run)
    if not dry_run:
        _construct(matches, injections, config, gguf_loader)
    return report


def _construct(matches: Sequence[_Match], injections: Sequence[Injection], config: Any,
               gguf_loader: Any) -> None:
    """Build operators children-first (reverse visiting order) and swap each into its parent; undo
    every swap if a constructor fails."""
    done: list[_Match] = []
    try:
        for m, inj in zip(reversed(matches), reversed(injections)):
            if m.rule.keeps:
                continue
            kwargs = dict(inj.kwargs)
            assert m.rule.replace_class is not None
            try:
                new = m.rule.replace_class(key=m.name, gguf_loader=gguf_loader, config=config,
                                           orig_module=m.module, **kwargs)
            except Exception as e:
                raise RuleError(f"{m.rule.where()}: constructing {m.rule.replace_class_path} for "
                                f"module {m.name!r} failed: {type(e).__name__}: {e}") from e
            if not isinstance(new, torch.nn.Module):
                raise RuleError(f"{m.rule.where()}: {m.rule.replace_class_path} returned a "
                                f"{type(new).__name__}, not an nn.Module")
            m.parent.add_module(m.child_name, new)
            done.append(m)
            log.debug("replaced %s by %s (rule %d)", m.name, m.rule.replace_class_path, m.rule.index)
    except BaseException:
        for m in reversed(done):
            m.parent.add_module(m.child_name, m.module)
        raise
