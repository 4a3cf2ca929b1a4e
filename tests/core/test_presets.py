"""Hardware presets: every one loads, names its sources and its GPU memory; model presets' KV shapes."""

from __future__ import annotations

from importlib import resources

import pytest

from hybrimoe_kt.core.hardware import PRESET_NAMES, load_profile
from hybrimoe_kt.core.models import MODEL_PRESETS

GPU_MEM = {"rtx4090-ddr5": 24, "a6000-tr5995wx": 48, "rtx4080-2x8452y": 16, "rtx5090-ddr5": 32,
           "rtx3090-ddr4": 24, "a6000-xeon10": 48}


def test_every_preset_file_is_listed() -> None:
    files = {p.name.removesuffix(".json")
             for p in resources.files("hybrimoe_kt.core").joinpath("profiles").iterdir() if p.name.endswith(".json")}
    assert files == set(PRESET_NAMES)
    assert set(GPU_MEM) == set(PRESET_NAMES)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_loads_with_sources_and_gpu_memory(name: str) -> None:
    p = load_profile(name)
    assert p.name == name
    assert p.gpu_mem_gib == GPU_MEM[name] and p.gpu_mem_gib > 0
    assert len(p.sources) >= 5 and all(isinstance(s, str) and s for s in p.sources)
    assert any(s.startswith("GPU memory") for s in p.sources)
    assert p.description
    assert p.pcie.bw_gbs < p.cpu.mem_bw_gbs * 2 and p.gpu.mem_bw_gbs > p.cpu.mem_bw_gbs


def test_link_to_host_memory_ratios_match_the_reference() -> None:
    ratio = {n: load_profile(n).pcie.bw_gbs / load_profile(n).cpu.mem_bw_gbs for n in PRESET_NAMES}
    assert ratio["rtx5090-ddr5"] > 0.85          # a copy costs about a CPU read
    assert 0.35 < ratio["rtx4090-ddr5"] < 0.45
    assert 0.4 < ratio["rtx3090-ddr4"] < 0.5
    xeon = load_profile("a6000-xeon10")
    assert xeon.pcie.bw_gbs < 16                 # Cascade Lake: PCIe 3.0
    assert any("HybriMoE" in s and "int4" in s for s in xeon.sources)


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_model_presets_know_their_kv_shape(name: str) -> None:
    m = MODEL_PRESETS[name]
    assert m.kv_known
    per_layer_values = m.kv_bytes_per_token() // (2 * m.n_layers)
    assert 256 <= per_layer_values <= 2 * 32 * 128
    if name.startswith("deepseek"):
        assert m.kv_latent == 576 and per_layer_values == 576
    parts = m.resident_params()
    assert parts["attention"] == m.n_layers * m.attn_params and parts["embeddings"] == m.vocab * m.hidden
