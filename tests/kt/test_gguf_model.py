"""A tiny model whose routed experts come from its GGUF file (Q8_0, kept quantized on the CPU tier):
the hybrid model's logits stay within quantization tolerance of the safetensors model's, for the stock
and hybrimoe rules, and `chat --gguf-path` runs. The GPU tier is the CPU stand-in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hybrimoe_kt.cli import main
from hybrimoe_kt.kt.loader import load_hybrid
from hybrimoe_kt.kt.tiny import load_model, make_tiny_model
from hybrimoe_kt.runtime.store_gguf import GgufExpertStore

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(make_tiny_model("qwen2-moe", tmp_path_factory.mktemp("g") / "m", seed=3, gguf=True)["dir"])


@pytest.mark.parametrize("kind", ["stock", "hybrimoe"])
def test_gguf_experts_match_safetensors(tiny_gguf: Path, kind: str) -> None:
    base, tok = load_model(tiny_gguf)
    ids = tok("a small test of the gguf path", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = base(ids).logits.float()
    rules = REPO / "optimize_rules" / f"Qwen2-MoE-{kind}.yaml"
    hm = load_hybrid(tiny_gguf, rules, progress=False, gguf_path=tiny_gguf / "model.gguf")
    assert isinstance(hm.runtime.store, GgufExpertStore)
    assert {t for lx in hm.runtime.store.layers for t in lx.types} == {"Q8_0"}
    with torch.no_grad():
        got = hm.model(ids).logits.float()
    assert float((got - ref).norm() / ref.norm()) < 0.1


def test_chat_with_gguf_path(tiny_gguf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["chat", "--model-path", str(tiny_gguf), "--gguf-path", str(tiny_gguf),
               "--optimize-config-path", str(REPO / "optimize_rules" / "Qwen2-MoE-hybrimoe.yaml"),
               "--prompt", "hello", "--max-new-tokens", "4", "--cpu-infer", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "decode: 4 tokens" in out and "CPU stand-in" in out


def test_gguf_without_the_layers_is_one_error(tmp_path: Path, tiny_gguf: Path) -> None:
    rules = REPO / "optimize_rules" / "Qwen2-MoE-hybrimoe.yaml"
    with pytest.raises(ValueError, match="exactly one .gguf"):
        load_hybrid(tiny_gguf, rules, progress=False, gguf_path=tmp_path)
