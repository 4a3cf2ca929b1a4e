"""GGUF files of MoE models: write a transformers MoE model with llama.cpp-style tensor names, read back
the routed expert tensors (raw quantized bytes) and dequantize them.

Routed experts are stored per layer as three 3-D tensors, numpy shapes ``blk.{i}.ffn_gate_exps.weight``
[E, I, H], ``ffn_up_exps`` [E, I, H], ``ffn_down_exps`` [E, H, I] (GGUF lists dims reversed: ne = (H, I,
E)); rows are quantized along the last axis. The ``gguf`` package (0.19) quantizes Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1, BF16 and F16 in numpy; it dequantizes K-quants but cannot produce them.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

log = logging.getLogger(__name__)

ExpertKey = tuple[int, str]                # (layer, "gate" | "up" | "down")
ExpertTensor = tuple[str, np.ndarray, tuple[int, ...]]   # (ggml type name, raw data, numpy shape)

EXPERT_TYPES = ("q8_0", "q4_0", "q5_0", "bf16", "f16", "f32")
PROJS = ("gate", "up", "down")
_EXPERT_NAME = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")

# transformers name (after "model.layers.{i}.") -> llama.cpp name (after "blk.{i}."); suffix kept
_LAYER_NAMES: Mapping[str, str] = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "self_attn.q_a_proj": "attn_q_a",
    "self_attn.q_a_layernorm": "attn_q_a_norm",
    "self_attn.q_b_proj": "attn_q_b",
    "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
    "self_attn.kv_a_layernorm": "attn_kv_a_norm",
    "self_attn.kv_b_proj": "attn_kv_b",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
    "mlp.shared_experts.up_proj": "ffn_up_shexp",
    "mlp.shared_experts.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
_GLOBAL_NAMES: Mapping[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp-style name of a non-expert transformers tensor; unknown names are kept as they are."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    m = re.match(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$", hf_name)
    if m:
        layer, stem, suffix = m.groups()
        if stem == "mlp.gate" and suffix == "weight":
            return f"blk.{layer}.ffn_gate_inp.weight"
        if stem in _LAYER_NAMES:
            return f"blk.{layer}.{_LAYER_NAMES[stem]}.{suffix}"
    m = re.match(r"^model\.layers\.(\d+)\.mlp\.gate\.e_score_correction_bias$", hf_name)
    if m:
        return f"blk.{m.group(1)}.exp_probs_b.bias"
    log.debug("no llama.cpp name for %s; kept as is", hf_name)
    return hf_name


def permute_rope_rows(w: Any, n_head: int, inverse: bool = False) -> Any:
    """llama.cpp's row order for the query/key projections of ``llama``-architecture files: within each
    head, the rows of the two rotary halves interleave (``inverse``: back to the Hugging Face order)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"a rotary projection of {rows} rows does not split into {n_head} heads of two halves")
    half = rows // n_head // 2
    split = (n_head, half, 2) if inverse else (n_head, 2, half)
    return w.reshape(*split, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _ggml_type(name: str) -> Any:
    from gguf import GGMLQuantizationType

    if name not in EXPERT_TYPES:
        raise ValueError(f"expert type {name!r} cannot be written; known: {', '.join(EXPERT_TYPES)} "
                         f"(the gguf package cannot quantize K-quants such as q4_k)")
    return GGMLQuantizationType[name.upper()]


def write_gguf(model: Any, path: str | Path, expert_type: str = "q8_0") -> Path:
    """Write ``model`` (a transformers MoE model of a known family) to ``path``: routed experts in
    ``expert_type``, every other tensor F32. Returns the path."""
    import torch
    from gguf import GGUFWriter, quants

    from hybrimoe_kt.kt.families import expert_weights, family_of, moe_blocks

    spec = family_of(model)
    qtype = _ggml_type(expert_type)
    path = Path(path)
    cfg = model.config
    writer = GGUFWriter(str(path), spec.gguf_arch)
    writer.add_name(f"tiny-{spec.name}")
    writer.add_string("hybrimoe.family", spec.name)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_expert_count(getattr(cfg, spec.n_experts_attr))
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    writer.add_expert_feed_forward_length(getattr(cfg, spec.expert_intermediate_attr))
    if spec.first_dense_attr:
        writer.add_leading_dense_block_count(getattr(cfg, spec.first_dense_attr))

    expert_params = set()
    for layer, block in moe_blocks(model):
        prefix = f"model.layers.{layer}.{spec.mlp_attr}.{spec.experts_attr}."
        expert_params.update(prefix + n for n, _ in block.experts.named_parameters())
        for proj, w in zip(PROJS, expert_weights(block, dtype=torch.float32)):
            data = w.numpy()
            # quantized data is uint8 [..., bytes per row]; the writer derives the weight shape from it
            writer.add_tensor(f"blk.{layer}.ffn_{proj}_exps.weight", quants.quantize(data, qtype),
                              raw_dtype=qtype)
    names = set()
    for name, tensor in model.state_dict().items():
        if name in expert_params:
            continue
        gname = gguf_tensor_name(name)
        if gname in names:
            raise ValueError(f"two tensors map to the GGUF name {gname}")
        names.add(gname)
        data = tensor.detach().float().contiguous().numpy()
        if spec.gguf_arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):  # llama.cpp's order
            heads = cfg.num_attention_heads if gname.endswith("attn_q.weight") else cfg.num_key_value_heads
            data = permute_rope_rows(data, heads)
        writer.add_tensor(gname, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log.info("wrote %s: experts %s", path, expert_type)
    return path


def read_gguf_experts(path: str | Path) -> dict[ExpertKey, ExpertTensor]:
    """Routed expert tensors of a GGUF file: (layer, proj) -> (ggml type name, raw data as stored,
    numpy-order shape of the weights, e.g. (E, I, H) for gate and up)."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"GGUF file {path} does not exist")
    reader = GGUFReader(str(path))
    out: dict[ExpertKey, ExpertTensor] = {}
    for t in reader.tensors:
        m = _EXPERT_NAME.match(t.name)
        if m:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            out[(int(m.group(1)), m.group(2))] = (t.tensor_type.name, np.asarray(t.data), shape)
    if not out:
        raise ValueError(f"{path} has no routed expert tensors (blk.N.ffn_gate_exps.weight ...)")
    return out


def dequantize_experts(experts: Mapping[ExpertKey, ExpertTensor]) -> dict[ExpertKey, np.ndarray]:
    """float32 weights of each entry of ``read_gguf_experts``, in its numpy shape."""
    from gguf import GGMLQuantizationType, quants

    out = {}
    for key, (type_name, raw, shape) in experts.items():
        w = quants.dequantize(raw, GGMLQuantizationType[type_name])
        out[key] = np.asarray(w, dtype=np.float32).reshape(shape)
    return out
