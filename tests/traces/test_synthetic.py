"""Synthetic traces: determinism, calibration against REFERENCE.md section 6, stats and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hybrimoe_kt.cli import main
from hybrimoe_kt.traces import load_trace
from hybrimoe_kt.traces.spec import parse_trace_spec
from hybrimoe_kt.traces.stats import compare_stats, trace_stats
from hybrimoe_kt.traces.synthetic import SyntheticParams, as_batched, synthetic_trace


def test_same_seed_same_trace_different_seed_different() -> None:
    a = synthetic_trace("olmoe-1b-7b", n_requests=2, prompt_len=8, decode_len=8, seed=5, n_layers=4)
    b = synthetic_trace("olmoe-1b-7b", n_requests=2, prompt_len=8, decode_len=8, seed=5, n_layers=4)
    c = synthetic_trace("olmoe-1b-7b", n_requests=2, prompt_len=8, decode_len=8, seed=6, n_layers=4)
    np.testing.assert_array_equal(a.experts, b.experts)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert not np.array_equal(a.experts, c.experts)
    w = a.weights.astype(np.float32)
    assert np.allclose(w.sum(axis=2), 1.0, atol=1e-2) and (np.diff(w, axis=2) <= 1e-3).all()


def test_mixtral_like_calibration() -> None:
    s = trace_stats(synthetic_trace("mixtral-8x7b", n_requests=4, prompt_len=32, decode_len=96, seed=0))
    assert 0.30 <= s["temporal_reuse"] <= 0.46
    assert 0.30 <= s["lru_hit_25%"] <= 0.46
    assert 0.54 <= s["lru_hit_50%"] <= 0.70
    assert s["interlayer_top1"] > 0.3


def test_qwen3_like_calibration() -> None:
    tr = synthetic_trace("qwen3-30b-a3b", n_requests=2, prompt_len=32, decode_len=128, seed=0, n_layers=12)
    s = trace_stats(tr)
    assert 0.35 <= s["temporal_reuse"] <= 0.6
    assert 0.65 <= s["reuse_within_8"] <= 0.9
    assert s["lru_hit_40%_warm64"] >= 0.85
    assert s["prefill_touch"] > 0.5


def test_shared_expert_models_have_less_locality() -> None:
    kw = dict(n_requests=2, prompt_len=16, decode_len=96, seed=1, n_layers=6)
    plain = trace_stats(synthetic_trace("olmoe-1b-7b", **kw))
    shared = trace_stats(synthetic_trace("deepseek-v2-lite", **kw))
    assert shared["reuse_within_8"] < plain["reuse_within_8"]


def test_bad_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="unknown model preset"):
        synthetic_trace("nope")
    with pytest.raises(ValueError, match="drift_rho"):
        SyntheticParams(drift_rho=1.5)
    with pytest.raises(ValueError, match="n_layers"):
        synthetic_trace("mixtral-8x7b", n_layers=99)


def test_parse_trace_spec(tmp_path: Path) -> None:
    tr = parse_trace_spec("synthetic:mixtral-8x7b:2", seed=1)
    assert tr.requests() == [0, 1] and tr.n_experts == 8
    with pytest.raises(ValueError, match="synthetic:PRESET"):
        parse_trace_spec("synthetic:", 0)
    with pytest.raises(ValueError, match="file not found"):
        parse_trace_spec(str(tmp_path / "absent"), 0)


def test_as_batched_groups_decode_tokens_per_step() -> None:
    tr = synthetic_trace("mixtral-8x7b", n_requests=3, prompt_len=4, decode_len=5, n_layers=2)
    b = as_batched(tr)
    fw = b.forwards()
    assert [f.n_tokens for f in fw] == [4, 4, 4] + [3] * 5
    assert b.requests() == [] and trace_stats(b)["streams"] == "steps"


def test_stats_on_real_mixtral_match_shared_stats(mixtral_trace_path: Path) -> None:
    s = trace_stats(load_trace(mixtral_trace_path))
    assert s["temporal_reuse"] == pytest.approx(0.3789, abs=0.002)
    assert s["lru_hit_25%"] == pytest.approx(0.3767, abs=0.002)
    assert s["lru_hit_50%"] == pytest.approx(0.6206, abs=0.002)
    rows = compare_stats([s], ["mixtral"])
    assert rows[0] == ["statistic", "mixtral"] and len(rows) > 10


def test_stats_on_real_qwen_match_shared_stats(qwen_trace_path: Path) -> None:
    s = trace_stats(load_trace(qwen_trace_path))
    assert s["lru_hit_25%"] == pytest.approx(0.2572, abs=0.002)
    assert s["unique_per_forward"] == pytest.approx(44.64, abs=0.01)


def test_cli_synth_trace_then_trace_stats(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "syn"
    assert main(["synth-trace", "--model", "mixtral-8x7b", "--seed", "2", "--out", str(out),
                 "--requests", "2", "--prompt-len", "4", "--decode-len", "6"]) == 0
    assert load_trace(out).n_tokens == 20
    assert main(["trace-stats", str(out), "synthetic:mixtral-8x7b:1"]) == 0
    assert "temporal_reuse" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["trace-stats", str(tmp_path / "missing")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["record", "--model-path", str(tmp_path), "--prompts", "x", "--out", "y"]) == 2
    assert "not a Hugging Face model folder" in capsys.readouterr().err


def test_cli_trace_stats_compares_real_and_synthetic(mixtral_trace_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    assert main(["trace-stats", "--shared", str(mixtral_trace_path.parent)]) == 0
    out = capsys.readouterr().out
    assert "synthetic:mixtral-8x7b" in out and "lru_hit_25%" in out
