"""kTransformers' invocation: a config/tokenizer folder and a full GGUF file (kt/gguf_weights.py). Every
weight but the routed experts is read from the GGUF (Mixtral's query/key rows in llama.cpp's order), the
experts stay quantized in the runtime's store; logits stay within quantization tolerance of the
safetensors model. The GPU tier is the CPU stand-in."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hybrimoe_kt.cli import main
from hybrimoe_kt.kt.gguf_io import permute_rope_rows
from hybrimoe_kt.kt.loader import load_hybrid
from hybrimoe_kt.kt.tiny import load_model, make_tiny_model
from hybrimoe_kt.runtime.store_gguf import GgufExpertStore

REPO = Path(__file__).resolve().parents[2]
RULES = {"mixtral": "Mixtral-hybrimoe.yaml", "qwen3-moe": "Qwen3-MoE-stock.yaml",
         "deepseek-v3": "DeepSeek-V3-hybrimoe.yaml"}


def split_folder(full: Path, out: Path) -> Path:
    """A copy of ``full`` without its weight files: config and tokenizer only."""
    out.mkdir()
    for p in full.iterdir():
        if p.suffix not in (".safetensors", ".gguf"):
            shutil.copy(p, out / p.name)
    return out


@pytest.fixture(scope="module", params=sorted(RULES))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    base = tmp_path_factory.mktemp(f"full-{request.param}")
    full = Path(make_tiny_model(request.param, base / "full", seed=3, gguf=True)["dir"])
    return request.param, full, split_folder(full, base / "cfg")


def test_every_weight_from_the_gguf(tiny: tuple[str, Path, Path]) -> None:
    family, full, cfg = tiny
    ref_model, tok = load_model(full)
    ids = tok("a small test of the gguf path", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = ref_model(ids).logits.float()
    hm = load_hybrid(cfg, REPO / "optimize_rules" / RULES[family], progress=False, gguf_path=full / "model.gguf")
    assert isinstance(hm.runtime.store, GgufExpertStore)
    assert not any(p.is_meta for p in hm.model.parameters())
    with torch.no_grad():
        got = hm.model(ids).logits.float()
    assert float((got - ref).norm() / ref.norm()) < 0.1


def test_chat_in_kt_spelling_with_a_full_gguf(tiny: tuple[str, Path, Path], capsys: pytest.CaptureFixture) -> None:
    family, full, cfg = tiny
    rc = main(["chat", "--model_path", str(cfg), "--gguf_path", str(full / "model.gguf"), "--optimize_config_path",
               str(REPO / "optimize_rules" / RULES[family]), "--cpu_infer", "1", "--max_new_tokens", "2",
               "--prompt", "hi"])
    assert rc == 0 and "decode: 2 tokens" in capsys.readouterr().out


def test_rope_rows_round_trip() -> None:
    w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    p = permute_rope_rows(w, 2)
    assert not np.array_equal(p, w) and np.array_equal(permute_rope_rows(p, 2, inverse=True), w)
    with pytest.raises(ValueError, match="heads"):
        permute_rope_rows(w, 3)


def test_missing_weights_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    full = Path(make_tiny_model("mixtral", tmp_path / "full", seed=1, gguf=True)["dir"])
    cfg = split_folder(full, tmp_path / "cfg")
    rules = str(REPO / "optimize_rules" / "Mixtral-hybrimoe.yaml")
    assert main(["chat", "--model-path", str(cfg), "--optimize-config-path", rules, "--prompt", "a"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no weight files" in err[0] and "--gguf-path" in err[0], err
    # an experts-only GGUF (no attention tensors) cannot build the model
    from gguf import GGUFReader, GGUFWriter

    src = GGUFReader(str(full / "model.gguf"))
    part = tmp_path / "experts.gguf"
    w = GGUFWriter(str(part), "llama")
    for t in src.tensors:
        if "_exps." in t.name:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert main(["chat", "--model-path", str(cfg), "--gguf-path", str(part), "--optimize-config-path", rules,
                 "--prompt", "a"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no tensor" in err[0], err
