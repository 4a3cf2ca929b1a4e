"""``rules check`` on a classic kTransformers rule file: a warning-level report instead of an error.

A classic rule file (``optimize_rules/classic/``) names kTransformers' own classes and this package's
classic operator, which import only where classic kTransformers is installed, and it matches
kTransformers' own modeling classes, which this package's model skeleton does not build. So the check
here validates what can be validated anywhere - the schema (keys, regexes, kwargs mappings, the kwargs
of ``hybrimoe_kt.kt.classic.KHybriMoEExperts``) - without importing a classic class, and reports the
classes that need the classic host and how to run the file there. Exit status (``exit_status``): 0
when the schema holds; a schema problem raises ``RuleError`` as ``load_rules`` does (the command's
one-line error, exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hybrimoe_kt.kt.classic import host
from hybrimoe_kt.kt.rules import CLASSIC_RULES, classic_classes, parse_rules, read_rules_yaml


@dataclass(frozen=True)
class ClassicReport:
    source: str
    n_rules: int
    classes: tuple[str, ...]
    host_available: bool
    exit_status: int = 0  # the schema holds; matching modules is left to the classic host

    def format(self) -> str:
        where = "installed here" if self.host_available else "not installed here"
        lines = [f"WARNING: {self.source} is a classic kTransformers rule file ({self.n_rules} rule(s), "
                 f"schema OK); {len(self.classes)} class(es) need the classic host (ktransformers, {where}):"]
        lines += [f"  {c}" for c in self.classes]
        lines.append("Modules were not matched (that needs kTransformers' own modeling classes). Run it with "
                     "python -m ktransformers.local_chat --model_path DIR --gguf_path GGUF_DIR "
                     f"--optimize_config_path {self.source} --cpu_infer N --use_cuda_graph False "
                     f"(rule files for that host: {CLASSIC_RULES}).")
        return "\n".join(lines)


def classic_report(path: str | Path) -> Optional[ClassicReport]:
    """The report for the rule file at ``path``; None when it names no classic class (check it with
    ``load_rules`` and the model skeleton as usual). RuleError on a schema problem."""
    data = read_rules_yaml(path)
    rules = parse_rules(data, str(path), skip_classic=True)
    classes = classic_classes(data)
    if not classes:
        return None
    return ClassicReport(str(path), len(rules), tuple(classes), host.available())
