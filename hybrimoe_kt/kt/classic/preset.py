"""The cost model's view of a model under classic kTransformers, from its config alone.

This package's own host counts a loaded model's attention weights; under kTransformers the operator
sees only the config (the model is built under meta and its other modules are kT's), so the attention
weights are counted from the config's shapes: MLA (``kv_lora_rank``, DeepSeek) by its q (or q_a/q_b),
kv_a, kv_b and o projections, GQA/MHA by q/k/v/o. The KV cache is the one kTransformers keeps: the
compressed latent (``kv_lora_rank + qk_rope_head_dim`` per layer) for MLA, K and V per head otherwise.
"""

from __future__ import annotations

from typing import Any

from hybrimoe_kt.core.models import ModelPreset


def _int(config: Any, name: str, default: int = 0) -> int:
    return int(getattr(config, name, default) or default)


def attention_params(config: Any) -> int:
    """Attention weights of one decoder layer, from the config's shapes (0 when it has none)."""
    hidden, heads = _int(config, "hidden_size"), _int(config, "num_attention_heads")
    if hidden == 0 or heads == 0:
        return 0
    if getattr(config, "kv_lora_rank", None):
        nope, rope, v = (_int(config, n) for n in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
        rank, q_rank = _int(config, "kv_lora_rank"), _int(config, "q_lora_rank")
        q_dim = heads * (nope + rope)
        q = hidden * q_rank + q_rank * q_dim if q_rank else hidden * q_dim
        return q + hidden * (rank + rope) + rank * heads * (nope + v) + heads * v * hidden
    head_dim = _int(config, "head_dim") or hidden // heads
    kv_heads = _int(config, "num_key_value_heads") or heads
    return 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim


def classic_preset(config: Any, n_moe_layers: int, n_experts: int, top_k: int, hidden: int,
                   inter: int) -> ModelPreset:
    """A model preset for the cost model and the memory check of a model under kTransformers."""
    n_layers = _int(config, "num_hidden_layers") or n_moe_layers
    if n_moe_layers > n_layers:
        raise ValueError(f"{n_moe_layers} MoE operators but the config has {n_layers} decoder layers")
    shared = _int(config, "shared_expert_intermediate_size") or _int(config, "n_shared_experts") * inter
    n_shared = _int(config, "n_shared_experts") or (1 if shared else 0)
    n_dense = n_layers - n_moe_layers
    heads = _int(config, "num_attention_heads")
    mla = bool(getattr(config, "kv_lora_rank", None))
    kv_latent = _int(config, "kv_lora_rank") + _int(config, "qk_rope_head_dim") if mla else 0
    head_dim = 0 if mla or heads == 0 else (_int(config, "head_dim") or _int(config, "hidden_size") // heads)
    kv_heads = 0 if mla else (_int(config, "num_key_value_heads") or heads)
    return ModelPreset(str(getattr(config, "model_type", "model")), str(getattr(config, "_name_or_path", "")),
                       n_layers, n_dense, n_experts, top_k, n_shared, hidden, inter, shared,
                       attention_params(config), _int(config, "vocab_size"),
                       dense_intermediate=_int(config, "intermediate_size") if n_dense else 0,
                       n_kv_heads=kv_heads, head_dim=head_dim, kv_latent=kv_latent,
                       tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)))
