"""apply_rules on a small hand-made model and on a meta-device Mixtral skeleton: first match wins,
name+class matching, 'default' keeps, recursive semantics, in-place swaps inside containers, strict
mode and rollback."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from hybrimoe_kt.kt.inject import InjectionReport, apply_rules
from hybrimoe_kt.kt.rules import Rule, RuleError, load_rules

from .operators import Declared, Fails, Wrap, path


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(4, 2)


def rules(tmp_path: Path, data: list[dict[str, Any]]) -> list[Rule]:
    f = tmp_path / "rules.yaml"
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_rules(f)


def names(report: InjectionReport, action: str | None = None) -> list[str]:
    return [i.name for i in report.injections if action is None or i.action == action]


def test_first_match_wins(tmp_path: Path) -> None:
    model = Tiny()
    rs = rules(tmp_path, [
        {"match": {"name": r"^layers\.0\.attn$"}, "replace": {"class": path(Wrap),
                                                             "kwargs": {"tag": "first"}}},
        {"match": {"name": r"\.attn$"}, "replace": {"class": path(Wrap), "kwargs": {"tag": "second"}},
         "recursive": False},
    ])
    report = apply_rules(model, rs)
    assert model.layers[0].attn.tag == "first" and model.layers[1].attn.tag == "second"
    assert report.counts == (1, 1)
    assert [(i.name, i.rule_index) for i in report.injections] == [
        ("layers.0.attn", 0), ("layers.1.attn", 1)]


def test_name_and_class_must_both_match(tmp_path: Path) -> None:
    model = Tiny()
    rs = rules(tmp_path, [{"match": {"name": r"^layers\.1\.", "class": "torch.nn.Linear"},
                           "replace": {"class": "default"}}])
    report = apply_rules(model, rs, dry_run=True)
    assert names(report) == ["layers.1.attn", "layers.1.mlp.0", "layers.1.mlp.2"]
    assert all(i.class_path == "torch.nn.modules.linear.Linear" for i in report.injections)


def test_default_keeps_module_and_records_kwargs(tmp_path: Path) -> None:
    model = Tiny()
    head = model.head
    rs = rules(tmp_path, [{"match": {"name": "^head$"},
                           "replace": {"class": "default", "kwargs": {"generate_device": "cuda:0"}}}])
    report = apply_rules(model, rs, default_device="cpu")
    assert model.head is head
    (inj,) = report.injections
    assert inj.action == "keep" and inj.name == "head"
    assert dict(inj.kwargs) == {"generate_device": "cuda:0", "prefill_device": "cpu"}


@pytest.mark.parametrize("recursive, inner", [(False, []), (True, ["layers.0.attn", "layers.0.mlp.0",
                                                                  "layers.0.mlp.2"])])
def test_recursive_on_kept_module(tmp_path: Path, recursive: bool, inner: list[str]) -> None:
    rs = rules(tmp_path, [
        {"match": {"name": r"^layers\.0$"}, "recursive": recursive},
        {"match": {"name": r"^layers\.0\.", "class": "torch.nn.Linear"}, "replace": {"class": "default"}},
    ])
    report = apply_rules(Tiny(), rs, strict=False, dry_run=True)
    assert names(report) == ["layers.0", *inner]


def test_recursive_on_replaced_module_rewrites_original_children_first(tmp_path: Path) -> None:
    model = Tiny()
    old_mlp = model.layers[0].mlp
    rs = rules(tmp_path, [
        {"match": {"name": r"^layers\.0\.mlp$"}, "replace": {"class": path(Wrap), "kwargs": {"tag": "mlp"}}},
        {"match": {"class": "torch.nn.Linear"}, "replace": {"class": path(Wrap), "kwargs": {"tag": "lin"}}},
    ])
    report = apply_rules(model, rs)
    new = model.layers[0].mlp
    assert isinstance(new, Wrap) and new.orig_module is old_mlp
    # the children were swapped inside the original Sequential, which the operator wraps
    assert isinstance(old_mlp[0], Wrap) and old_mlp[0].key == "layers.0.mlp.0"
    assert isinstance(old_mlp[1], nn.ReLU) and isinstance(old_mlp[2], Wrap)
    # operators' own children (orig_module Linear inside each Wrap) were never matched again
    assert report.counts == (1, 7)  # every original Linear once, the Wraps' inner ones never
    assert "layers.0.mlp.0.orig_module" not in names(report)
    assert new(torch.ones(1, 4)).shape == (1, 4)


def test_recursive_false_on_replaced_module_leaves_children(tmp_path: Path) -> None:
    model = Tiny()
    rs = rules(tmp_path, [
        {"match": {"name": r"\.mlp$"}, "replace": {"class": path(Wrap)}, "recursive": False},
        {"match": {"class": "torch.nn.Linear"}, "replace": {"class": path(Wrap)}},
    ])
    report = apply_rules(model, rs)
    assert names(report, "replace") == ["layers.0.attn", "layers.0.mlp", "layers.1.attn",
                                        "layers.1.mlp", "head"]
    assert type(model.layers[0].mlp.orig_module[0]) is nn.Linear


def test_in_place_inside_module_list_and_sequential(tmp_path: Path) -> None:
    model = Tiny()
    first, second = model.layers[0], model.layers[1]
    rs = rules(tmp_path, [
        {"match": {"name": r"^layers\.1$"}, "replace": {"class": path(Wrap)}, "recursive": False},
        {"match": {"name": r"^layers\.0\.mlp\.2$"}, "replace": {"class": path(Declared),
                                                               "kwargs": {"slots": 3}}},
    ])
    apply_rules(model, rs)
    assert type(model.layers) is nn.ModuleList and len(model.layers) == 2
    assert model.layers[0] is first and isinstance(model.layers[1], Wrap)
    assert model.layers[1].orig_module is second
    assert [n for n, _ in model.named_children()] == ["layers", "head"]
    assert isinstance(model.layers[0].mlp[2], Declared) and model.layers[0].mlp[2].slots == 3
    assert [type(m) for m in model.layers[0].mlp][:2] == [nn.Linear, nn.ReLU]


def test_contract_arguments_passed(tmp_path: Path) -> None:
    model = Tiny()
    rs = rules(tmp_path, [{"match": {"name": "^head$", "class": "torch.nn.Linear"},
                           "replace": {"class": path(Wrap), "kwargs": {"prefill_device": "cuda"}}}])
    cfg, loader = object(), object()
    apply_rules(model, rs, config=cfg, gguf_loader=loader, default_device="meta")
    op = model.head
    assert (op.key, op.config, op.gguf_loader) == ("head", cfg, loader)
    assert (op.prefill_device, op.generate_device) == ("cuda", "meta")


def test_unmatched_rule_is_error_when_strict(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = Tiny()
    rs = rules(tmp_path, [{"match": {"name": "^head$"}, "replace": {"class": path(Wrap)}},
                          {"match": {"name": "^no_such_module$"}}])
    with pytest.raises(RuleError) as e:
        apply_rules(model, rs)
    assert "rule 1 ({match: {name: ^no_such_module$}})" in str(e.value)
    assert type(model.head) is nn.Linear  # nothing touched before the error
    with caplog.at_level(logging.WARNING):
        report = apply_rules(model, rs, strict=False)
    assert [r.index for r in report.unmatched()] == [1] and "matched no module" in caplog.text
    assert isinstance(model.head, Wrap)


def test_failed_constructor_rolls_back(tmp_path: Path) -> None:
    model = Tiny()
    before = dict(model.named_modules())
    rs = rules(tmp_path, [{"match": {"class": "torch.nn.Linear"},
                           "replace": {"class": path(Fails), "kwargs": {"fail_on": "layers.0.attn"}}}])
    with pytest.raises(RuleError, match="module 'layers.0.attn' failed: RuntimeError"):
        apply_rules(model, rs)
    after = dict(model.named_modules())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_dry_run_touches_nothing_and_formats_table(tmp_path: Path) -> None:
    model = Tiny()
    rs = rules(tmp_path, [{"match": {"class": "torch.nn.Linear"}, "replace": {"class": path(Wrap)}}])
    report = apply_rules(model, rs, dry_run=True)
    assert all(type(m) is not Wrap for m in model.modules())
    text = report.format()
    assert "layers.1.mlp.2" in text and "replace (dry run)" in text and "rule 0: 7 module(s)" in text


def test_mixtral_skeleton_experts_replaced(mixtral_dir: Path) -> None:
    from hybrimoe_kt.kt.skeleton import load_skeleton

    model, config = load_skeleton(mixtral_dir)
    rs = load_rules(write_mixtral_rules(mixtral_dir.parent))
    report = apply_rules(model, rs, config=config)
    assert names(report, "replace") == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    op = model.model.layers[1].mlp.experts
    assert isinstance(op, Wrap) and op.config is config and op.tag == "experts"


def write_mixtral_rules(folder: Path) -> Path:
    f = folder / "mixtral-rules.yaml"
    f.write_text(yaml.safe_dump([
        {"match": {"name": r"^model\.layers\.\d+\.mlp\.experts$"},
         "replace": {"class": path(Wrap), "kwargs": {"tag": "experts", "generate_device": "cpu"}},
         "recursive": False},
        {"match": {"class": "transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock"},
         "replace": {"class": "default", "kwargs": {"prefill_device": "cuda"}}},
    ], sort_keys=False))
    return f
