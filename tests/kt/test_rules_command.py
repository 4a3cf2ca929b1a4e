"""``hybrimoe-kt rules check`` in-process on a tiny Mixtral folder: the matched module names, and
one-line errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybrimoe_kt.cli import main

from .test_inject import write_mixtral_rules

ERROR_PREFIX = "hybrimoe-kt rules: error:"


def check(rules: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(["rules", "check", str(rules), "--model-path", str(model)])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2
    assert err.startswith(ERROR_PREFIX) and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


def test_check_prints_matched_modules(mixtral_dir: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = check(write_mixtral_rules(tmp_path), mixtral_dir, capsys)
    assert rc == 0 and err == ""
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.startswith("model.")}
    assert list(rows) == ["model.layers.0.mlp", "model.layers.0.mlp.experts",
                          "model.layers.1.mlp", "model.layers.1.mlp.experts"]
    assert rows["model.layers.0.mlp.experts"][1:4] == ["0", "replace", "(dry"]
    assert rows["model.layers.0.mlp"][1:3] == ["1", "keep"]
    assert "rule 0: 2 module(s)" in out and "rule 1: 2 module(s)" in out
    assert "2 rule(s) OK, 4 module(s) matched" in out


def test_missing_model_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = check(write_mixtral_rules(tmp_path), tmp_path / "absent", capsys)
    assert_one_line_error(rc, err, "absent does not exist", "--model-path")


def test_folder_without_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    rc, _, err = check(write_mixtral_rules(tmp_path), tmp_path / "empty", capsys)
    assert_one_line_error(rc, err, "has no config.json")


def test_unknown_architecture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "weird"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "no-such-moe", "architectures": ["X"]}))
    rc, _, err = check(write_mixtral_rules(tmp_path), d, capsys)
    assert_one_line_error(rc, err, "config.json", "no-such-moe")


def test_bad_rule_file(mixtral_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("- match: {name: experts}\n- match: {name: mlp}\n  replace: {class: nosuch_pkg.Op}\n")
    rc, _, err = check(f, mixtral_dir, capsys)
    assert_one_line_error(rc, err, str(f), "rule 1 ({match: {name: mlp}", "no module named 'nosuch_pkg'")


def test_rule_matching_nothing_warns(mixtral_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "unmatched.yaml"
    f.write_text("- match: {name: 'experts$'}\n- match: {name: '^model\\.shared_experts$'}\n")
    rc, out, err = check(f, mixtral_dir, capsys)
    assert rc == 0, err
    warned = [r for r in caplog.records if r.levelname == "WARNING"]  # stderr outside pytest
    assert len(warned) == 1 and "1 rule(s) matched no module" in warned[0].message
    assert "rule 1 (" in warned[0].message
    assert "rule 1: 0 module(s)" in out and "<- matched nothing" in out
    assert "1 matched nothing (an error with --strict)" in out


def test_rule_matching_nothing_is_an_error_with_strict(mixtral_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "unmatched.yaml"
    f.write_text("- match: {name: 'experts$'}\n- match: {name: '^model\\.shared_experts$'}\n")
    rc = main(["rules", "check", str(f), "--model-path", str(mixtral_dir), "--strict"])
    out, err = capsys.readouterr()
    assert_one_line_error(rc, err, "1 rule(s) matched no module", "rule 1 (")
    assert out == ""


def test_model_path_needed_for_a_plain_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["rules", "check", str(write_mixtral_rules(tmp_path))])
    _, err = capsys.readouterr()
    assert_one_line_error(rc, err, "--model-path is required")


def test_missing_rules_file(mixtral_dir: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = check(tmp_path / "nope.yaml", mixtral_dir, capsys)
    assert_one_line_error(rc, err, "nope.yaml does not exist")
