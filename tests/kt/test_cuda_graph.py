"""Decode steps through the CUDA-graph path (``kt.cuda_graph``): on the CPU stand-in the graphed step
runs without capture, and must generate exactly what the eager loop generates, for every family under
the stock and hybrimoe rules, with the same runtime counters. Capture itself needs a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hybrimoe_kt.kt.families import FAMILIES
from hybrimoe_kt.kt.generation import generate
from hybrimoe_kt.kt.loader import load_hybrid
from hybrimoe_kt.kt.tiny import make_tiny_model
from tests.kt.rule_files import rule_file

PROMPT = "the quick brown fox jumps"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("graph")
    return {f: Path(make_tiny_model(f, root / f, seed=2)["dir"]) for f in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kind", ["stock", "hybrimoe"])
def test_graphed_step_generates_what_the_eager_loop_does(tiny: dict[str, Path], family: str, kind: str) -> None:
    runs = {}
    for mode in (False, "eager"):
        hm = load_hybrid(tiny[family], rule_file(family, kind), progress=False)
        ids = hm.tokenizer(PROMPT, return_tensors="pt").input_ids
        runs[mode] = generate(hm, ids, 8, stop_on_eos=False, cuda_graph=mode)
    eager, graphed = runs[False], runs["eager"]
    assert graphed.cuda_graph == "eager" and eager.cuda_graph == "off"
    assert graphed.tokens == eager.tokens
    assert graphed.counters == eager.counters  # forwards, hits, CPU/GPU split, copies
    if kind == "hybrimoe":
        assert graphed.counters.gpu_experts > 0


def test_cuda_graph_on_without_a_gpu_is_one_clear_error(tiny: dict[str, Path]) -> None:
    hm = load_hybrid(tiny["mixtral"], rule_file("mixtral", "hybrimoe"), progress=False)
    with pytest.raises(ValueError, match="cannot be captured here: the model runs on cpu"):
        generate(hm, [1, 2, 3], 2, cuda_graph=True)
    assert generate(hm, [1, 2, 3], 2, stop_on_eos=False).cuda_graph == "off"  # auto: off on the CPU


def test_a_per_layer_strategy_cannot_take_the_graph_path(tiny: dict[str, Path]) -> None:
    hm = load_hybrid(tiny["mixtral"], rule_file("mixtral", "hybrimoe"), progress=False,
                     overrides={"strategy": "hybrimoe-layer"})
    with pytest.raises(ValueError, match="decides per layer in decode"):
        generate(hm, [1, 2, 3], 2, cuda_graph="eager")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs an NVIDIA GPU")
def test_captured_decode_replays_on_cuda(tiny: dict[str, Path], tmp_path: Path) -> None:
    text = rule_file("deepseek-v2", "hybrimoe").read_text()
    text = text.replace("generate_device: cpu", "generate_device: cuda").replace("prefill_device: cpu",
                                                                                  "prefill_device: cuda")
    cuda_rules = tmp_path / "cuda.yaml"
    cuda_rules.write_text(text)
    hm = load_hybrid(tiny["deepseek-v2"], cuda_rules, progress=False)
    ids = hm.tokenizer(PROMPT, return_tensors="pt").input_ids
    eager = generate(hm, ids, 8, stop_on_eos=False, cuda_graph=False)
    graphed = generate(hm, ids, 8, stop_on_eos=False, cuda_graph=True)
    assert graphed.cuda_graph == "replayed", graphed.cuda_graph
    assert len(graphed.tokens) == len(eager.tokens)
    assert graphed.counters.forwards == eager.counters.forwards  # replayed steps are counted
