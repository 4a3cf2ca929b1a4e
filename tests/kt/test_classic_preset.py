"""The classic host's cost-model preset, counted from a model config alone, agrees with the hand-written
presets of ``core.models`` (DeepSeek-V2-Lite: MLA, a dense first layer, shared experts; Mixtral: GQA)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from hybrimoe_kt.core.models import get_model
from hybrimoe_kt.kt.classic.preset import attention_params, classic_preset

DEEPSEEK_V2_LITE = SimpleNamespace(  # config.json of deepseek-ai/DeepSeek-V2-Lite (the fields used)
    model_type="deepseek_v2", hidden_size=2048, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, num_hidden_layers=27, n_shared_experts=2,
    moe_intermediate_size=1408, intermediate_size=10944, vocab_size=102400, num_key_value_heads=16)
MIXTRAL = SimpleNamespace(  # mistralai/Mixtral-8x7B-v0.1
    model_type="mixtral", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32,
    intermediate_size=14336, vocab_size=32000)


@pytest.mark.parametrize("config, name, moe_layers, experts, top_k, inter", [
    (DEEPSEEK_V2_LITE, "deepseek-v2-lite", 26, 64, 6, 1408),
    (MIXTRAL, "mixtral-8x7b", 32, 8, 2, 14336),
])
def test_preset_from_config_matches_the_hand_written_one(config, name: str, moe_layers: int, experts: int,
                                                         top_k: int, inter: int) -> None:
    want = get_model(name)
    got = classic_preset(config, moe_layers, experts, top_k, config.hidden_size, inter)
    for field in ("n_layers", "n_dense_layers", "n_experts", "top_k", "n_shared_experts", "hidden",
                  "expert_intermediate", "shared_intermediate", "attn_params", "vocab", "dense_intermediate",
                  "n_kv_heads", "head_dim", "kv_latent"):
        assert getattr(got, field) == getattr(want, field), field
    assert got.kv_bytes_per_token() == want.kv_bytes_per_token()


def test_config_without_shapes() -> None:
    assert attention_params(SimpleNamespace()) == 0
    with pytest.raises(ValueError, match="3 MoE operators but the config has 2 decoder layers"):
        classic_preset(SimpleNamespace(num_hidden_layers=2), 3, 8, 2, 64, 64)
