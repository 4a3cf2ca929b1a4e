"""Rule-file parsing and validation: every rejected input names the file, the rule (index and
text) and the problem; valid rules become frozen Rule objects."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from hybrimoe_kt.kt.rules import Rule, RuleError, load_rules

from .operators import Declared, NeedsSlots, NoContract, NotAModule, Wrap, path

MOE = "transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock"


def write(tmp_path: Path, data: Any) -> Path:
    f = tmp_path / "rules.yaml"
    f.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return f


def rejected(tmp_path: Path, rules: list[Any], index: int, *needles: str) -> str:
    """Load a rule list whose rule ``index`` is bad; the message names file, rule and problem."""
    f = write(tmp_path, rules)
    with pytest.raises(RuleError) as e:
        load_rules(f)
    msg = str(e.value)
    assert str(f) in msg and f"rule {index} (" in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


GOOD = {"match": {"name": "^head$"}}


def test_valid_rules_become_frozen_rules(tmp_path: Path) -> None:
    f = write(tmp_path, [
        {"match": {"name": r"\.mlp$", "class": "torch.nn.Sequential"},
         "replace": {"class": path(Wrap), "kwargs": {"tag": "x", "generate_device": "cpu"}},
         "recursive": False},
        {"match": {"class": "torch.nn.Linear"}, "replace": {"class": "default"}},
        {"match": {"name": "head"}},
    ])
    r0, r1, r2 = load_rules(f)
    assert isinstance(r0, Rule) and r0.index == 0 and r0.source == str(f)
    assert r0.name_pattern is not None and r0.name_pattern.pattern == r"\.mlp$"
    import torch
    assert r0.match_class is torch.nn.Sequential and r0.replace_class is Wrap
    assert dict(r0.kwargs) == {"tag": "x", "generate_device": "cpu"} and r0.recursive is False
    assert r1.keeps and r1.replace_class_path == "default" and r1.recursive is True
    assert r2.keeps and dict(r2.kwargs) == {} and r2.match_class is None  # no replace = keep
    with pytest.raises(dataclasses.FrozenInstanceError):
        r0.recursive = True  # type: ignore[misc]
    with pytest.raises(TypeError):
        r0.kwargs["tag"] = "y"  # type: ignore[index]


def test_declared_kwargs_and_required_kwargs_accepted(tmp_path: Path) -> None:
    f = write(tmp_path, [
        {"match": {"name": "a"}, "replace": {"class": path(Declared), "kwargs": {"slots": 4}}},
        {"match": {"name": "b"}, "replace": {"class": path(NeedsSlots), "kwargs": {"slots": 4}}},
    ])
    assert [r.replace_class for r in load_rules(f)] == [Declared, NeedsSlots]


@pytest.mark.parametrize("text, needle", [
    ("", "empty"),
    ("[]", "list of rules is empty"),
    ("match: {name: x}\n", "expected a YAML list"),
    ("- match: {name: [x\n", "not valid YAML"),
])
def test_bad_file_shape(tmp_path: Path, text: str, needle: str) -> None:
    f = write(tmp_path, text)
    with pytest.raises(RuleError, match=needle) as e:
        load_rules(f)
    assert str(f) in str(e.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RuleError, match="does not exist"):
        load_rules(tmp_path / "nope.yaml")


def test_rule_not_a_mapping(tmp_path: Path) -> None:
    rejected(tmp_path, [GOOD, "just a string"], 1, "just a string", "must be a mapping")


def test_no_match_key(tmp_path: Path) -> None:
    rejected(tmp_path, [GOOD, {"replace": {"class": "default"}}], 1, "no 'match' key",
             "{replace: {class: default}}")


@pytest.mark.parametrize("rule, needle", [
    ({"match": {"name": "x"}, "recurse": False}, "['recurse'] in the rule"),
    ({"match": {"name": "x", "klass": "torch.nn.Linear"}}, "['klass'] in 'match'"),
    ({"match": {"name": "x"}, "replace": {"class": "default", "device": "cpu"}}, "['device'] in 'replace'"),
])
def test_unknown_keys(tmp_path: Path, rule: dict[str, Any], needle: str) -> None:
    rejected(tmp_path, [GOOD, rule], 1, needle, "allowed:")


def test_empty_match_and_replace_without_class(tmp_path: Path) -> None:
    rejected(tmp_path, [{"match": {}}], 0, "'match' is empty")
    rejected(tmp_path, [{"match": {"name": "x"}, "replace": {"kwargs": {}}}], 0, "has no 'class'")


def test_bad_regex_reports_re_error(tmp_path: Path) -> None:
    rejected(tmp_path, [GOOD, {"match": {"name": "layers\\.[0-"}}], 1,
             "not a valid regex", "unterminated character set", "layers")


@pytest.mark.parametrize("cls, needle", [
    ("nosuchpkg_xyz.Block", "no module named 'nosuchpkg_xyz'"),
    ("torch.nn.NoSuchLayer", "'torch.nn' has no attribute 'NoSuchLayer'"),
    ("torch.nn.functional.relu", "not a class"),
    ("Linear", "not a dotted path"),
])
def test_match_class_not_importable(tmp_path: Path, cls: str, needle: str) -> None:
    rejected(tmp_path, [GOOD, {"match": {"class": cls}}], 1, "match.class", repr(cls), needle)


@pytest.mark.parametrize("cls, needle", [
    ("nosuchpkg_xyz.ops.Op", "no module named 'nosuchpkg_xyz'"),
    ("tests_missing_attr", "not a dotted path"),
    (path(Wrap) + "Nope", "has no attribute 'WrapNope'"),
])
def test_replace_class_not_importable(tmp_path: Path, cls: str, needle: str) -> None:
    rejected(tmp_path, [{"match": {"name": "x"}, "replace": {"class": cls}}], 0, "replace.class",
             needle)


def test_replace_class_not_module_or_breaks_contract(tmp_path: Path) -> None:
    rejected(tmp_path, [{"match": {"name": "x"}, "replace": {"class": path(NotAModule)}}], 0,
             "not a torch.nn.Module subclass")
    rejected(tmp_path, [{"match": {"name": "x"}, "replace": {"class": path(NoContract)}}], 0,
             "does not follow the operator contract", "orig_module")


def test_kwargs_not_a_mapping(tmp_path: Path) -> None:
    rejected(tmp_path, [GOOD, {"match": {"name": "x"},
                               "replace": {"class": path(Wrap), "kwargs": ["tag", "x"]}}],
             1, "replace.kwargs must be a mapping")


def test_unknown_kwarg_from_signature_lists_accepted(tmp_path: Path) -> None:
    rejected(tmp_path, [{"match": {"name": "x"},
                         "replace": {"class": path(Wrap), "kwargs": {"tga": "oops"}}}], 0,
             "unknown kwargs ['tga']", "accepted: ['generate_device', 'prefill_device', 'tag']")


def test_unknown_kwarg_from_declared_kwargs(tmp_path: Path) -> None:
    rejected(tmp_path, [{"match": {"name": "x"},
                         "replace": {"class": path(Declared), "kwargs": {"slotz": 2}}}], 0,
             "unknown kwargs ['slotz']", "'slots'", "'tag'")


def test_engine_supplied_and_missing_required_kwargs(tmp_path: Path) -> None:
    rejected(tmp_path, [{"match": {"name": "x"},
                         "replace": {"class": path(Wrap), "kwargs": {"key": "k"}}}], 0,
             "['key'] are supplied by the engine")
    rejected(tmp_path, [{"match": {"name": "x"}, "replace": {"class": path(NeedsSlots)}}], 0,
             "requires kwargs ['slots']")


def test_default_accepts_only_device_kwargs(tmp_path: Path) -> None:
    rejected(tmp_path, [{"match": {"name": "x"},
                         "replace": {"class": "default", "kwargs": {"tag": 1}}}], 0,
             "unknown kwargs ['tag'] for class 'default'")


def test_recursive_must_be_bool(tmp_path: Path) -> None:
    rejected(tmp_path, [{"match": {"name": "x"}, "recursive": "no"}], 0, "'recursive' must be true")


def test_long_rule_text_is_shortened(tmp_path: Path) -> None:
    msg = rejected(tmp_path, [{"match": {"name": "x" * 300}, "recursive": 3}], 0, "xxx...")
    assert "x" * 200 not in msg
