"""``hybrimoe-kt ab`` on a tiny Mixtral: stock vs hybrimoe, JSON with both sides, B/A, agreement, the
CPU stand-in label and a SIMULATED projection (a small synthetic trace keeps it fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybrimoe_kt.cli import main

RULES = Path(__file__).resolve().parents[2] / "optimize_rules"


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hybrimoe_kt.kt.tiny import make_tiny_model

    return Path(make_tiny_model("mixtral", tmp_path_factory.mktemp("ab") / "mixtral", seed=3)["dir"])


def ab_args(model: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["ab", "--model-path", str(model), "--rules-a", str(RULES / "Mixtral-stock.yaml"),
            "--rules-b", str(RULES / "Mixtral-hybrimoe.yaml"), "--prompts", str(prompts),
            "--max-new-tokens", "4", "--cpu-infer", "1", "--json", str(out), *extra]


def test_ab_writes_the_comparison(tiny_mixtral: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\n\nThe quick brown fox\n")
    out = tmp_path / "ab.json"
    png = tmp_path / "ab.png"
    assert main(ab_args(tiny_mixtral, prompts, out, "--plot", str(png),
                        "--sim-trace", "synthetic:mixtral-8x7b:1")) == 0
    text = capsys.readouterr().out
    assert "SIMULATED" in text and "CPU stand-in" in text and "B/A" in text
    d = json.loads(out.read_text())
    for key in ("a", "b", "ratio", "agreement", "gpu_tier", "simulated_projection", "provenance"):
        assert key in d, key
    assert d["a"]["strategy"] == "stock" and d["b"]["strategy"] == "hybrimoe"
    for side in ("a", "b"):
        s = d[side]
        assert s["new_tokens"] == 2 * 4 and len(s["per_prompt"]) == 2
        assert s["prefill_tok_s"] > 0 and s["decode_tok_s"] > 0 and 0 <= s["hit_rate"] <= 1
        assert s["cpu_experts"] + s["gpu_experts"] > 0 and s["gb_copied"] >= 0
    assert d["a"]["gpu_experts"] == 0 and d["b"]["gpu_experts"] > 0
    assert d["ratio"]["decode_tok_s"] > 0 and d["ratio"]["prefill_tok_s"] > 0
    assert 0.0 <= d["agreement"]["overall"] <= 1.0 and len(d["agreement"]["per_prompt"]) == 2
    assert d["gpu_tier"]["stand_in"] is True and "CPU stand-in" in d["gpu_tier"]["b"]
    sim = d["simulated_projection"]
    assert sim["label"] == "SIMULATED" and sim["hardware"] == "rtx4090-ddr5"
    assert sim["a"]["strategy"] == "stock" and sim["b"]["strategy"] == "hybrimoe"
    assert sim["a"]["decode_tok_s"] > 0 and sim["ratio"]["decode_tok_s"] > 0
    assert "commit" in d["provenance"]
    assert png.is_file() and png.stat().st_size > 0


@pytest.mark.parametrize("change, message", [
    ({"--max-new-tokens": "0"}, "--max-new-tokens"),
    ({"--prompts": "missing.txt"}, "does not exist"),
    ({"--rules-b": "missing.yaml"}, "does not exist"),
    ({"--hardware": "no-such-box"}, "no-such-box"),
])
def test_ab_user_errors(tiny_mixtral: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                        change: dict[str, str], message: str) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    args = ab_args(tiny_mixtral, prompts, tmp_path / "o.json")
    for flag, value in change.items():
        value = str(tmp_path / value) if value.endswith((".txt", ".yaml")) else value
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o.json").exists()
