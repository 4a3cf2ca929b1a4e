"""``hybrimoe-kt chat`` on a tiny Mixtral: one prompt, interactive turns from stdin, and user errors."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from hybrimoe_kt.cli import main

REPO = Path(__file__).resolve().parents[2]
HYBRIMOE = str(REPO / "optimize_rules" / "Mixtral-hybrimoe.yaml")
STATS = ("prefill:", "decode:", "GPU-tier hit rate:", "GPU tier: CPU stand-in")


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hybrimoe_kt.kt.tiny import make_tiny_model

    return Path(make_tiny_model("mixtral", tmp_path_factory.mktemp("chat") / "mixtral", seed=1)["dir"])


def chat(model: Path, *extra: str) -> list[str]:
    return ["chat", "--model-path", str(model), "--optimize-config-path", HYBRIMOE, "--cpu-infer", "1", *extra]


def test_one_prompt_streams_text_and_prints_stats(tiny_mixtral: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(chat(tiny_mixtral, "--prompt", "What is the capital of France?", "--max-new-tokens", "5")) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].strip(), "the streamed answer comes first"
    for head in STATS:
        assert sum(line.startswith(head) for line in out) == 1, (head, out)
    assert any(line.startswith("decode: 5 tokens") for line in out)


def test_interactive_two_turns_then_eof(tiny_mixtral: Path, capsys: pytest.CaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n\nhow many legs does a spider have?\n"))
    assert main(chat(tiny_mixtral, "--max-new-tokens", "3")) == 0
    out = capsys.readouterr().out.splitlines()
    prefill = [line for line in out if line.startswith("prefill:")]
    assert len(prefill) == 2 and all(sum(line.startswith(h) for line in out) == 2 for h in STATS)
    # the second turn's prompt holds the first turn (the conversation is kept)
    n = [int(line.split()[1]) for line in prefill]
    assert n[1] > n[0] + len("how many legs does a spider have?") // 8


def test_exit_ends_the_conversation(tiny_mixtral: Path, capsys: pytest.CaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("exit\nnot read\n"))
    assert main(chat(tiny_mixtral, "--max-new-tokens", "2")) == 0
    assert "prefill:" not in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--prompt", "a", "--prompt-file", "f.txt"], "not both"),
    (["--prompt", "a", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--prompt", "a", "--gguf-path", "x.gguf"], "does not exist"),
    (["--prompt", "a", "--cpu-infer", "0"], "--cpu-infer"),
])
def test_bad_flags_exit_2_with_one_line(tiny_mixtral: Path, capsys: pytest.CaptureFixture, extra: list[str],
                                        message: str) -> None:
    assert main(chat(tiny_mixtral, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_missing_model_dir_and_bad_rules(tmp_path: Path, tiny_mixtral: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(chat(tmp_path / "nope", "--prompt", "a")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a model folder" in err[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("- match: {name: '('}\n")
    args = ["chat", "--model-path", str(tiny_mixtral), "--optimize-config-path", str(bad), "--prompt", "a"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.yaml" in err[0], err
