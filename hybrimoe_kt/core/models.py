"""Model presets as data: MoE shape of each supported model family and expert sizes per weight format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, get_args

WeightFormat = Literal["bf16", "q8_0", "q4_k_m", "int4-g128", "int8"]

# Bits per weight including block scales. q4_k_m counts every tensor as Q4_K (144 bytes per 256
# weights); llama.cpp's _M mix stores some ffn_down tensors as Q6_K, which this ignores (it is the
# 4.5 bit/weight convention of the bound table in the project's reference notes). int4-g128 is the
# GPU 4-bit layout (GPTQ/Marlin style: 4-bit weights, one fp16 scale per 128 weights).
BITS_PER_WEIGHT: Mapping[str, float] = {
    "bf16": 16.0,
    "q8_0": 8.5,          # 34 bytes per block of 32
    "q4_k_m": 4.5,        # 144 bytes per block of 256
    "int4-g128": 4.125,   # 4 bits + fp16 scale per 128
    "int8": 8.0 + 16 / 4096,  # weight-only int8, one fp16 scale per output row (H ~ 4096)
}


@dataclass(frozen=True, slots=True)
class ModelPreset:
    """Shape of a MoE model. Counts refer to the MoE layers unless stated otherwise."""

    name: str
    hf_id: str
    n_layers: int            # all decoder layers
    n_dense_layers: int      # leading layers with a dense MLP instead of MoE
    n_experts: int           # routed experts per MoE layer
    top_k: int
    n_shared_experts: int
    hidden: int
    expert_intermediate: int  # routed expert FFN width
    shared_intermediate: int  # total width of the shared expert(s) of one layer (0 if none)
    attn_params: int          # attention weights per layer (approximate; MLA counted by its projections)
    vocab: int
    dense_intermediate: int = 0  # FFN width of the leading dense layers (0 if none)
    # KV cache shape. GQA/MHA models: n_kv_heads x head_dim for K and again for V per layer and token.
    # MLA models (DeepSeek): kv_latent = kv_lora_rank + qk_rope_head_dim, the compressed latent that
    # kTransformers/SGLang cache instead of per-head K and V (Hugging Face's eager DeepSeek code
    # decompresses and caches full per-head K/V; see kv_bytes_per_token). All 0 = unknown.
    n_kv_heads: int = 0
    head_dim: int = 0
    kv_latent: int = 0
    tied_embeddings: bool = False  # LM head shares the embedding matrix (counted once)

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"{self.name}: top_k={self.top_k} must be in 1..n_experts={self.n_experts}")
        if not 0 <= self.n_dense_layers < self.n_layers:
            raise ValueError(f"{self.name}: n_dense_layers={self.n_dense_layers} out of range")
        if min(self.n_kv_heads, self.head_dim, self.kv_latent) < 0:
            raise ValueError(f"{self.name}: n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
                             f"kv_latent={self.kv_latent} must be >= 0 (0 = unknown)")

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def expert_params(self) -> int:
        """gate, up and down projections of one routed expert."""
        return 3 * self.hidden * self.expert_intermediate

    def expert_bytes(self, fmt: str) -> int:
        return int(round(self.expert_params * bits_per_weight(fmt) / 8))

    def expert_flops(self, n_tokens: int = 1) -> float:
        return 2.0 * self.expert_params * n_tokens

    def shared_bytes(self, fmt: str) -> int:
        return int(round(3 * self.hidden * self.shared_intermediate * bits_per_weight(fmt) / 8))

    def attn_bytes(self, fmt: str) -> int:
        return int(round(self.attn_params * bits_per_weight(fmt) / 8))

    def extra_params(self) -> int:
        """Weights read once per forward outside the MoE layers: dense layers and the LM head."""
        dense = self.n_dense_layers * (self.attn_params + 3 * self.hidden * self.dense_intermediate)
        return dense + self.vocab * self.hidden

    def routed_bytes_per_token(self, fmt: str) -> int:
        return self.n_moe_layers * self.top_k * self.expert_bytes(fmt)

    @property
    def kv_known(self) -> bool:
        return self.kv_latent > 0 or (self.n_kv_heads > 0 and self.head_dim > 0)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV cache bytes per token over all layers (bf16 by default); 0 when the shape is unknown.

        MLA: one latent vector of ``kv_latent`` values per layer (the compressed cache of kTransformers
        and SGLang); GQA/MHA: K and V, ``n_kv_heads * head_dim`` each."""
        per_layer = self.kv_latent if self.kv_latent > 0 else 2 * self.n_kv_heads * self.head_dim
        return self.n_layers * per_layer * dtype_bytes

    def resident_params(self) -> dict[str, int]:
        """Weights that stay on the GPU besides the routed experts, by part (parameter counts)."""
        h = self.hidden
        return {
            "attention": self.n_layers * self.attn_params,
            "shared_experts": self.n_moe_layers * 3 * h * self.shared_intermediate,
            "dense_mlp": self.n_dense_layers * 3 * h * self.dense_intermediate,
            "embeddings": self.vocab * h,
            "lm_head": 0 if self.tied_embeddings else self.vocab * h,
            # routers and RMSNorm weights (two per layer and the final one), kept in bf16
            "routers_norms": self.n_moe_layers * self.n_experts * h + (2 * self.n_layers + 1) * h,
        }


def bits_per_weight(fmt: str) -> float:
    try:
        return BITS_PER_WEIGHT[fmt]
    except KeyError:
        raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join(BITS_PER_WEIGHT)}") from None


# Shapes from each model's Hugging Face config.json. attn_params: q/k/v/o projections for GQA models,
# q(_a/_b), kv_a, kv_b and o projections for MLA (DeepSeek). KV shape: num_key_value_heads and head_dim
# (hidden / num_attention_heads where the config has no head_dim); MLA latent = kv_lora_rank (512) +
# qk_rope_head_dim (64). No preset ties its embeddings (tie_word_embeddings false in every config).
MODEL_PRESETS: Mapping[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset("mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1", 32, 0, 8, 2, 0, 4096, 14336, 0,
                    4096 * 4096 * 2 + 2 * 4096 * 1024, 32000, n_kv_heads=8, head_dim=128),
        ModelPreset("qwen2-57b-a14b", "Qwen/Qwen2-57B-A14B", 28, 0, 64, 8, 1, 3584, 2560, 20480,
                    3584 * 3584 * 2 + 2 * 3584 * 512, 151936, n_kv_heads=4, head_dim=128),
        ModelPreset("deepseek-v2-lite", "deepseek-ai/DeepSeek-V2-Lite", 27, 1, 64, 6, 2, 2048, 1408,
                    2 * 1408, 2048 * 16 * 192 + 2048 * 576 + 512 * 16 * 256 + 16 * 128 * 2048, 102400,
                    dense_intermediate=10944, kv_latent=512 + 64),
        ModelPreset("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", 48, 0, 128, 8, 0, 2048, 768, 0,
                    2048 * 4096 * 2 + 2 * 2048 * 512, 151936, n_kv_heads=4, head_dim=128),
        ModelPreset("deepseek-v3", "deepseek-ai/DeepSeek-V3", 61, 3, 256, 8, 1, 7168, 2048, 2048,
                    7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168,
                    129280, dense_intermediate=18432, kv_latent=512 + 64),
        ModelPreset("qwen1.5-moe-a2.7b", "Qwen/Qwen1.5-MoE-A2.7B", 24, 0, 60, 4, 4, 2048, 1408, 5632,
                    4 * 2048 * 2048, 151936, n_kv_heads=16, head_dim=128),
        ModelPreset("olmoe-1b-7b", "allenai/OLMoE-1B-7B-0924", 16, 0, 64, 8, 0, 2048, 1024, 0,
                    4 * 2048 * 2048, 50304, n_kv_heads=16, head_dim=128),
    )
}

ModelName = Literal["mixtral-8x7b", "qwen2-57b-a14b", "deepseek-v2-lite", "qwen3-30b-a3b",
                    "deepseek-v3", "qwen1.5-moe-a2.7b", "olmoe-1b-7b"]


assert set(MODEL_PRESETS) == set(get_args(ModelName))


def get_model(name: str) -> ModelPreset:
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(MODEL_PRESETS)}") from None
