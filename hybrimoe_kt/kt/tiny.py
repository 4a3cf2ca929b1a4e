"""Tiny random-weight MoE models of every supported family, built from the family's real transformers
config class, saved as a Hugging Face directory (safetensors, config, tokenizer) that loads offline.

Shapes: hidden 64, 4 decoder layers, 8 routed experts, top-2, routed expert intermediate 256 (a
multiple of 256 as kt-kernel's GGUF path needs), vocabulary of the tiny tokenizer (384).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

from hybrimoe_kt.kt.families import FAMILIES, get_family

log = logging.getLogger(__name__)

HIDDEN = 64
N_LAYERS = 4
N_EXPERTS = 8
TOP_K = 2
EXPERT_INTERMEDIATE = 256
VOCAB = 384

_COMMON: Mapping[str, Any] = dict(
    hidden_size=HIDDEN, num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
    num_experts_per_tok=TOP_K, max_position_embeddings=512, tie_word_embeddings=False,
    initializer_range=0.05, vocab_size=VOCAB,
)
_MLA: Mapping[str, Any] = dict(
    num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
    head_dim=8, intermediate_size=256, moe_intermediate_size=EXPERT_INTERMEDIATE, n_routed_experts=N_EXPERTS,
    first_k_dense_replace=1,
)

# family -> config keyword arguments on top of _COMMON
TINY_CONFIGS: Mapping[str, Mapping[str, Any]] = {
    "mixtral": dict(intermediate_size=EXPERT_INTERMEDIATE, num_local_experts=N_EXPERTS),
    "qwen2-moe": dict(intermediate_size=256, moe_intermediate_size=EXPERT_INTERMEDIATE, num_experts=N_EXPERTS,
                      shared_expert_intermediate_size=256, norm_topk_prob=False),
    "qwen3-moe": dict(intermediate_size=256, moe_intermediate_size=EXPERT_INTERMEDIATE, num_experts=N_EXPERTS,
                      head_dim=16, norm_topk_prob=True),
    # DeepSeek-V2 (236B style): no q LoRA, group-limited greedy routing, routed scaling, 2 shared experts
    "deepseek-v2": dict(_MLA, q_lora_rank=None, n_shared_experts=2, topk_method="group_limited_greedy",
                        n_group=4, topk_group=2, routed_scaling_factor=2.0, norm_topk_prob=False),
    # DeepSeek-V3: q LoRA, sigmoid routing with score correction bias, grouped top-k, renormalised
    "deepseek-v3": dict(_MLA, q_lora_rank=32, n_shared_experts=1, n_group=4, topk_group=2,
                        routed_scaling_factor=2.5, norm_topk_prob=True),
    "olmoe": dict(intermediate_size=EXPERT_INTERMEDIATE, num_experts=N_EXPERTS, norm_topk_prob=False),
}
assert set(TINY_CONFIGS) == set(FAMILIES)


def tiny_config(family: str, vocab_size: int = VOCAB, bos: int = 1, eos: int = 2, pad: int = 0) -> Any:
    """The family's real config class with tiny dimensions."""
    import transformers

    spec = get_family(family)
    cls = getattr(transformers, spec.config_class)
    kwargs = dict(_COMMON, **TINY_CONFIGS[family])
    kwargs.update(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    return cls(**kwargs)


def build_tiny_model(family: str, seed: int = 0, vocab_size: int = VOCAB) -> Any:
    """A random-weight ``<Family>ForCausalLM`` in fp32 and eval mode; the same seed gives the same weights."""
    import torch
    import transformers

    spec = get_family(family)
    config = tiny_config(family, vocab_size=vocab_size)
    config.architectures = [spec.model_class]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, spec.model_class)(config)
        _randomize_router_biases(model, spec.router.bias_attr)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model.eval()


def _randomize_router_biases(model: Any, bias_attr: Optional[str]) -> None:
    """Score correction biases start at zero; small random values make tests exercise them."""
    import torch

    if bias_attr is None:
        return
    for module in model.modules():
        bias = getattr(module, bias_attr, None)
        if isinstance(bias, torch.Tensor):
            with torch.no_grad():
                bias.copy_(torch.randn_like(bias) * 0.05)


def check_out_dir(out: str | Path, force: bool = False) -> Path:
    """``out`` as a Path; ValueError when it is a file, or a non-empty folder without ``force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"--out {out} is not empty; pass --force to write into it anyway")
    return out


def make_tiny_model(family: str, out: str | Path, seed: int = 0, gguf: bool = False,
                    force: bool = False) -> dict[str, Any]:
    """Build, save and return a summary: ``{dir, family, params, files, gguf}``. ``out`` must be empty
    or absent unless ``force``."""
    from hybrimoe_kt.kt.tiny_tokenizer import build_tokenizer

    get_family(family)
    out = check_out_dir(out, force)
    out.mkdir(parents=True, exist_ok=True)
    log.info("training the tiny tokenizer")
    tokenizer = build_tokenizer(VOCAB)
    log.info("building a random %s model (seed %d)", family, seed)
    model = build_tiny_model(family, seed=seed, vocab_size=len(tokenizer))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    gguf_path = None
    if gguf:
        from hybrimoe_kt.kt.gguf_io import write_gguf

        log.info("writing the GGUF file")
        gguf_path = write_gguf(model, out / "model.gguf")
    return {"dir": str(out), "family": family, "params": sum(p.numel() for p in model.parameters()),
            "files": sorted(p.name for p in out.iterdir()), "gguf": None if gguf_path is None else str(gguf_path)}


def load_model(path: str | Path, dtype: Any = None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from a local Hugging Face directory; never downloads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a model directory (no config.json)")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer
