"""Tiny random-weight models of every family: saved, loaded back offline, greedy generation is
deterministic; the make-tiny-model command and its one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hybrimoe_kt.cli import main  # noqa: E402
from hybrimoe_kt.kt.families import FAMILIES, get_family  # noqa: E402
from hybrimoe_kt.kt.tiny import (EXPERT_INTERMEDIATE, N_EXPERTS, TOP_K, build_tiny_model,  # noqa: E402
                                 load_model, make_tiny_model)

N_NEW = 5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: tiny matmuls on a shared 2-core machine are slower with more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(FAMILIES))
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp(request.param) / "model"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        info = make_tiny_model(request.param, out, seed=7)
        model, tokenizer = load_model(out)
    return request.param, out, info, model, tokenizer


def _greedy(model, tokenizer) -> list[int]:
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Which experts run?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_saved_files_and_config(saved) -> None:
    family, out, info, model, tokenizer = saved
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (out / name).is_file(), name
    spec = get_family(family)
    cfg = model.config
    assert type(model).__name__ == spec.model_class and type(cfg).__name__ == spec.config_class
    assert getattr(cfg, spec.n_experts_attr) == N_EXPERTS and cfg.num_experts_per_tok == TOP_K
    assert getattr(cfg, spec.expert_intermediate_attr) == EXPERT_INTERMEDIATE
    assert EXPERT_INTERMEDIATE % 256 == 0
    assert cfg.vocab_size == len(tokenizer) and info["params"] == sum(p.numel() for p in model.parameters())
    if spec.first_dense_attr:
        assert getattr(cfg, spec.first_dense_attr) == 1
    if family == "qwen3-moe":
        assert cfg.norm_topk_prob is True


def test_tokenizer_special_tokens_and_chat_template(saved) -> None:
    _, _, _, model, tokenizer = saved
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    text = "Experts: 8, top-2. Ünïcode ok."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           tokenize=False)
    assert prompt == "<s><|user|>\nhi</s>\n<|assistant|>\n"


def test_loaded_weights_equal_built_ones(saved) -> None:
    family, _, _, model, _ = saved
    fresh = build_tiny_model(family, seed=7)
    loaded = model.state_dict()
    for name, value in fresh.state_dict().items():
        assert torch.equal(loaded[name], value), name
    other = build_tiny_model(family, seed=8).state_dict()
    assert not torch.equal(other["model.embed_tokens.weight"], loaded["model.embed_tokens.weight"])


def test_greedy_generation_is_deterministic(saved) -> None:
    _, _, _, model, tokenizer = saved
    first = _greedy(model, tokenizer)
    assert len(first) == N_NEW and all(0 <= t < len(tokenizer) for t in first)
    assert _greedy(model, tokenizer) == first


def test_out_dir_rules(tmp_path: Path) -> None:
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty; pass --force"):
        make_tiny_model("mixtral", tmp_path)
    with pytest.raises(ValueError, match="known: mixtral, qwen2-moe"):
        make_tiny_model("llama", tmp_path / "new")


def test_cli_writes_model_and_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "olmoe"
    assert main(["make-tiny-model", "--family", "olmoe", "--out", str(out), "--gguf", "--seed", "3"]) == 0
    text = capsys.readouterr().out
    assert "[1/3]" in text and "[3/3]" in text and "generated 8 tokens" in text
    assert (out / "model.gguf").is_file() and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("argv,message", [
    (["--family", "llama"], "unknown model family 'llama'; known: mixtral"),
    (["--family", "olmoe", "--gguf-experts", "q4_k"], "--gguf-experts 'q4_k' is not one of"),
    (["--family", "olmoe"], "is not empty; pass --force"),
])
def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                 message: str) -> None:
    (tmp_path / "junk.txt").write_text("x")
    assert main(["make-tiny-model", "--out", str(tmp_path), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
