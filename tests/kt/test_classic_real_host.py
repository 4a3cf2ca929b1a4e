"""The classic operator on a real classic kTransformers install (marker ``ktransformers_classic``; skipped
with the reason where ``ktransformers`` cannot be imported - every CPU-only machine, since classic kT
needs a CUDA build). Checks what needs no model: the operator class builds on kT's own base classes and
is instantiable, and every rule file of ``optimize_rules/classic/`` parses against kT's real classes."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

from hybrimoe_kt.kt.classic import host

CLASSIC = Path(__file__).resolve().parents[2] / "optimize_rules" / "classic"

pytestmark = pytest.mark.ktransformers_classic


@pytest.fixture(scope="module")
def kt_experts() -> object:
    if not host.available():
        pytest.skip("classic kTransformers (the ktransformers package, a CUDA build) is not installed")
    try:
        return importlib.import_module("ktransformers.operators.experts")
    except Exception as e:  # an install that cannot load its CUDA extension is not a usable host
        pytest.skip(f"ktransformers is installed but ktransformers.operators.experts does not import: "
                    f"{type(e).__name__}: {e}")


def test_operator_builds_on_the_real_bases(kt_experts: object) -> None:
    from ktransformers.operators.base_operator import BaseInjectedModule

    import hybrimoe_kt.kt.classic as classic

    cls = classic.KHybriMoEExperts
    assert issubclass(cls, BaseInjectedModule) and issubclass(cls, kt_experts.KExpertsBase)
    assert not inspect.isabstract(cls)


@pytest.mark.parametrize("path", sorted(CLASSIC.glob("*.yaml")), ids=lambda p: p.stem)
def test_rule_files_parse_against_kt(kt_experts: object, path: Path) -> None:
    from hybrimoe_kt.kt.classic.settings import OPERATOR_PATH
    from hybrimoe_kt.kt.rules import load_rules

    rules = load_rules(path)
    assert sum(r.replace_class_path == OPERATOR_PATH for r in rules) == 1
