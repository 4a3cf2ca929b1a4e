"""kTransformers' and the HybriMoE release's flag spellings, and the runtime-setting flags of chat/serve
(commands/runtime_flags.py): they parse, map to the rule-kwarg overrides, and refuse what does not map."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from hybrimoe_kt.cli import build_parser, main
from hybrimoe_kt.commands.runtime_flags import model_experts, runtime_overrides

REPO = Path(__file__).resolve().parents[2]
HYBRIMOE = str(REPO / "optimize_rules" / "Mixtral-hybrimoe.yaml")


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hybrimoe_kt.kt.tiny import make_tiny_model

    return Path(make_tiny_model("mixtral", tmp_path_factory.mktemp("flags") / "mixtral", seed=1)["dir"])


def parse(*argv: str) -> argparse.Namespace:
    return build_parser(list(argv)).parse_args(list(argv))


def test_chat_runs_with_kt_spellings(tiny_mixtral: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["chat", "--model_path", str(tiny_mixtral), "--optimize_config_path", HYBRIMOE, "--max_new_tokens",
               "3", "--cpu_infer", "1", "--use_cuda_graph", "False", "--prompt", "hello"])
    out = capsys.readouterr().out
    assert rc == 0 and "decode: 3 tokens" in out


def test_strategy_and_budget_flags_override_the_rules(tiny_mixtral: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["chat", "--model-path", str(tiny_mixtral), "--optimize-config-path", HYBRIMOE, "--cpu-infer", "1",
               "--strategy", "stock", "--max-new-tokens", "3", "--prompt", "hello"])
    out = capsys.readouterr().out
    assert rc == 0
    split = next(line for line in out.splitlines() if line.startswith("GPU-tier hit rate:"))
    assert "experts CPU/GPU:" in split and "/0 (0.0% on the GPU tier)" in split  # stock: nothing on the GPU


def test_overrides_map_the_flags(tiny_mixtral: Path) -> None:
    n = model_experts(tiny_mixtral)
    base = ["chat", "--model-path", str(tiny_mixtral), "--optimize-config-path", HYBRIMOE]
    assert runtime_overrides(parse(*base), tiny_mixtral) is None
    o = runtime_overrides(parse(*base, "--cache_size", "2", "--strategy", "hybrimoe-paper", "--prefetch-depth",
                                "2", "--cpu_infer", "3", "--hardware-profile", "rtx5090-ddr5"), tiny_mixtral)
    assert o == {"strategy": "hybrimoe-paper", "cache_ratio": 2 / n, "gpu_slots": None, "gpu_gib": None,
                 "prefetch_depth": 2, "hardware_profile": "rtx5090-ddr5", "cpu_threads": 3}
    o = runtime_overrides(parse(*base, "--gpu-slots", "5", "--prefetch_size", "0"), tiny_mixtral)
    assert o == {"cache_ratio": None, "gpu_slots": 5, "gpu_gib": None}


@pytest.mark.parametrize("extra, message", [
    (["--prefetch_size", "4"], "does not map"),
    (["--strategy", "oracle"], "only in the simulator"),
    (["--strategy", "nope"], "unknown strategy"),
    (["--cache-ratio", "1.5"], "[0, 1]"),
    (["--cache_size", "999"], "routed experts per layer"),
    (["--prefetch-depth", "0"], "--prefetch-depth"),
    (["--hardware-profile", "no-such-gpu"], "no-such-gpu"),
    (["--placement-counts", "missing.npy"], "does not exist"),
    (["--use_cuda_graph", "True", "--cuda-graph", "off"], "contradicts"),
    (["--force_think", "--no-chat-template"], "--force-think"),
])
def test_flags_that_do_not_map_are_one_line_errors(tiny_mixtral: Path, capsys: pytest.CaptureFixture,
                                                   extra: list[str], message: str) -> None:
    rc = main(["chat", "--model-path", str(tiny_mixtral), "--optimize-config-path", HYBRIMOE, "--prompt", "a",
               *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err


def test_force_think_appends_the_think_prefix(tiny_mixtral: Path) -> None:
    from transformers import AutoTokenizer

    from hybrimoe_kt.commands.chat import THINK, prompt_ids

    tok = AutoTokenizer.from_pretrained(tiny_mixtral)
    plain = prompt_ids(tok, [], "hi", parse("chat", "--model-path", "m", "--optimize-config-path", "r"))
    think = prompt_ids(tok, [], "hi", parse("chat", "--model-path", "m", "--optimize-config-path", "r",
                                            "--force_think"))
    assert think[: len(plain)] == plain and think[len(plain):] == tok.encode(THINK, add_special_tokens=False)


def test_serve_and_ab_accept_kt_spellings() -> None:
    s = parse("serve", "--model_path", "m", "--optimize_config_path", "r", "--gguf_path", "g", "--cpu_infer", "2",
              "--port", "0", "--cache_size", "4")
    assert (s.model_path, s.optimize_config_path, s.gguf_path, s.cpu_infer, s.cache_size) == ("m", "r", "g", 2, 4)
    a = parse("ab", "--model_path", "m", "--rules-a", "a", "--rules-b", "b", "--prompts", "p", "--json", "o",
              "--max_new_tokens", "4", "--use_cuda_graph", "false")
    assert (a.model_path, a.max_new_tokens, a.use_cuda_graph) == ("m", 4, False)
    with pytest.raises(SystemExit):  # one budget at a time
        parse("serve", "--model-path", "m", "--optimize-config-path", "r", "--gpu-slots", "1", "--cache-ratio", "0.5")
