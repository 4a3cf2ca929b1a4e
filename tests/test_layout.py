"""The package layout: modules live in sub-packages, nothing below the CLI imports it, no path hacks."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "hybrimoe_kt"

# `from hybrimoe_kt.commands... import`, `import hybrimoe_kt.cli`, `from hybrimoe_kt import commands, ...`
CLI_IMPORT = re.compile(
    r"^\s*(?:from\s+hybrimoe_kt\.(?:commands|cli)\b"
    r"|import\s+(?:[\w.]+\s*,\s*)*hybrimoe_kt\.(?:commands|cli)\b"
    r"|from\s+hybrimoe_kt\s+import\s+(?:\(\s*)?(?:[\w\s,]*,\s*)?(?:commands|cli)\b)",
    re.MULTILINE)
SEARCH_PATH = re.compile(r"\bsys\.path\b")


def _sources(*roots: Path, suffixes: tuple[str, ...] = (".py",)) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*")
                  if p.is_file() and p.suffix in suffixes and "__pycache__" not in p.parts)


def test_package_root_holds_only_init_and_cli() -> None:
    assert sorted(p.name for p in PKG.glob("*.py")) == ["__init__.py", "cli.py"]


def test_cli_import_pattern() -> None:
    hits = ["from hybrimoe_kt.commands.simulate import infer_model",
            "    from hybrimoe_kt.cli import main",
            "import hybrimoe_kt.commands.ab",
            "import os, hybrimoe_kt.cli",
            "from hybrimoe_kt import cli",
            "from hybrimoe_kt import core, commands"]
    misses = ["from hybrimoe_kt.sim.defaults import infer_model",
              "from hybrimoe_kt.core.cli_helpers import x",
              "from hybrimoe_kt import client",
              "# see hybrimoe_kt.commands.simulate"]
    assert all(CLI_IMPORT.search(s) for s in hits)
    assert not any(CLI_IMPORT.search(s) for s in misses)


def test_no_module_below_the_cli_imports_it() -> None:
    allowed = {PKG / "cli.py"}
    offenders = []
    for path in _sources(PKG, REPO / "kernels", REPO / "scripts"):
        if path in allowed or (PKG / "commands") in path.parents:
            continue
        for m in CLI_IMPORT.finditer(path.read_text(encoding="utf-8")):
            offenders.append(f"{path.relative_to(REPO)}: {m.group(0).strip()}")
    assert not offenders, "modules outside commands/ and cli.py import the CLI layer:\n" + "\n".join(offenders)


def test_nothing_edits_the_module_search_path() -> None:
    offenders = []
    for path in _sources(PKG, REPO / "kernels", REPO / "scripts", REPO / "tests", suffixes=(".py", ".sh")):
        text = path.read_text(encoding="utf-8")
        for i, line in enumerate(text.splitlines(), 1):
            if SEARCH_PATH.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, "import the installed package (pip install -e .) instead:\n" + "\n".join(offenders)
