"""GPU memory budget: hand-computed sizes for Mixtral-8x7B, the one-line refusal, max ratio, GiB sizing."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from hybrimoe_kt.core.memory import (GIB, RESERVE_GIB, MemoryWorkload, cache_ratio_for_gib,
                                     check_runtime_memory, max_cache_ratio, memory_budget)
from hybrimoe_kt.core.models import get_model

MIXTRAL = get_model("mixtral-8x7b")  # 32 layers, 8 experts, H 4096, I 14336, 8 KV heads x 128, vocab 32000


def test_mixtral_bf16_sizes_by_hand() -> None:
    b = memory_budget(MIXTRAL, "bf16", 24.0)
    assert b.expert_bytes == 3 * 4096 * 14336 * 2                 # 352 MB per expert
    assert b.resident["attention"] == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024) * 2
    assert b.resident["embeddings"] == b.resident["lm_head"] == 32000 * 4096 * 2
    assert b.resident["shared_experts"] == b.resident["dense_mlp"] == 0
    assert b.resident["kv_cache"] == 4096 * 32 * 2 * 8 * 128 * 2  # tokens x layers x (K, V) x heads x dim x bf16
    assert b.resident["kv_cache"] == 512 * 2**20
    assert b.resident["reserve"] == RESERVE_GIB * GIB
    # 25% = 2 of 8 experts in each of 32 layers
    assert b.cache_bytes(0.25) == 2 * 32 * b.expert_bytes
    assert b.cache_bytes(0.25) == 21 * GIB
    # resident ~3.0 GiB of weights + 0.5 KV + 1 reserve; one slot per layer (10.5 GiB) fits, two do not
    assert 2.9 * GIB < b.weight_bytes < 3.1 * GIB
    assert b.fits(0.125) and not b.fits(0.25)
    assert b.max_ratio() == 0.125


def test_int4_shrinks_weights_not_the_kv_cache() -> None:
    bf16, int4 = memory_budget(MIXTRAL, "bf16", 24.0), memory_budget(MIXTRAL, "int4-g128", 24.0)
    assert int4.expert_bytes == pytest.approx(bf16.expert_bytes * 4.125 / 16, rel=1e-6)
    assert int4.resident["kv_cache"] == bf16.resident["kv_cache"]
    assert int4.resident["routers_norms"] == bf16.resident["routers_norms"]  # kept bf16
    assert max_cache_ratio(MIXTRAL, "int4-g128", 24.0) == 1.0


def test_mla_kv_cache_is_the_latent() -> None:
    v3 = get_model("deepseek-v3")  # 61 layers, latent 512 + rope 64
    assert v3.kv_bytes_per_token() == 61 * 576 * 2
    b = memory_budget(v3, "bf16", 80.0, MemoryWorkload(context_tokens=1000, batch=3))
    assert b.resident["kv_cache"] == 61 * 576 * 2 * 1000 * 3


def test_refusal_is_one_line_with_needed_available_and_largest_ratio() -> None:
    v3 = get_model("deepseek-v3")
    b = memory_budget(v3, "int4-g128", 24.0)
    with pytest.raises(ValueError) as e:
        b.check(0.25, where="hardware profile rtx4090-ddr5")
    msg = str(e.value)
    assert "\n" not in msg
    need = float(re.search(r"needs ([0-9.]+) GiB", msg).group(1))
    assert need == pytest.approx((b.resident_bytes + b.cache_bytes(0.25)) / GIB, abs=0.05)
    assert 75 < b.cache_bytes(0.25) / GIB < 85  # 64 x 58 experts of ~22.7 MB
    assert "24 GiB" in msg and "rtx4090-ddr5" in msg
    best = b.max_ratio()
    assert best is not None and 0 < best < 0.25 and b.fits(best) and not b.fits(best + 1 / 256)
    assert f"largest cache ratio that fits is {best:.4g}" in msg


def test_nothing_fits_and_unknown_memory() -> None:
    tiny_gpu = memory_budget(get_model("deepseek-v3"), "bf16", 8.0)
    assert tiny_gpu.max_ratio() is None
    with pytest.raises(ValueError, match="no cache ratio fits"):
        max_cache_ratio(get_model("deepseek-v3"), "bf16", 8.0)
    unknown = memory_budget(get_model("deepseek-v3"), "bf16", 0.0)
    assert unknown.fits(1.0)
    unknown.check(1.0)  # no budget, no refusal
    with pytest.raises(ValueError, match="gpu_mem_gib"):
        max_cache_ratio(get_model("deepseek-v3"), "bf16", 0.0)


def test_cache_ratio_for_gib_whole_slots() -> None:
    per_slot = 32 * MIXTRAL.expert_bytes("bf16")  # one slot in every layer: 10.5 GiB
    assert cache_ratio_for_gib(MIXTRAL, "bf16", 21.0) == 0.25
    assert cache_ratio_for_gib(MIXTRAL, "bf16", 20.9) == 0.125
    assert cache_ratio_for_gib(MIXTRAL, "bf16", 1000.0) == 1.0
    assert cache_ratio_for_gib(MIXTRAL, "bf16", 0.0) == 0.0
    with pytest.raises(ValueError, match=f"{per_slot / GIB:.2f} GiB"):
        cache_ratio_for_gib(MIXTRAL, "bf16", 5.0)
    with pytest.raises(ValueError, match="-1"):
        cache_ratio_for_gib(MIXTRAL, "bf16", -1.0)


def test_runtime_check_from_numbers() -> None:
    slot = 100 * 2**20
    check_runtime_memory(free_bytes=10 * GIB, loaded_bytes=3 * GIB, kv_bytes=GIB, slot_bytes=slot, slots=80,
                         max_slots=256)
    with pytest.raises(ValueError) as e:
        check_runtime_memory(free_bytes=4 * GIB, loaded_bytes=3 * GIB, kv_bytes=GIB, slot_bytes=slot, slots=80,
                             max_slots=256)
    msg = str(e.value)
    assert "\n" not in msg
    assert "needs 12.8 GiB" in msg and "7.0 GiB available" in msg   # 3 + 1 + 1 + 7.8; 4 free + 3 loaded
    assert "largest that fits is 20 slots" in msg                    # (4 - 1 - 1) GiB / 100 MiB


def test_hf_kv_cache_layout() -> None:
    pytest.importorskip("torch")
    from hybrimoe_kt.kt.runtime_attach import check_gpu_memory, hf_kv_bytes_per_token

    gqa = SimpleNamespace(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096)
    assert hf_kv_bytes_per_token(gqa) == 32 * 2 * 8 * 128 * 2
    mla = SimpleNamespace(num_hidden_layers=27, num_attention_heads=16, kv_lora_rank=512, qk_nope_head_dim=128,
                          qk_rope_head_dim=64, v_head_dim=128)
    assert hf_kv_bytes_per_token(mla) == 27 * 16 * (128 + 64 + 128) * 2  # decompressed, not the latent
    assert hf_kv_bytes_per_token(None) == 0
    import torch

    check_gpu_memory(torch.nn.Linear(2, 2), "cpu", slot_bytes=1, slots=10**12, max_slots=10**12)  # skipped
