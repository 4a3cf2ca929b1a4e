"""A model whose every weight comes from a GGUF file: kTransformers' invocation, a config/tokenizer
folder plus a full GGUF (``--model-path DIR --gguf-path FILE`` where DIR holds no weight files).

The model is built from the folder's config on the meta device, so no weight is allocated before it
is read. Every tensor but the routed experts is then read from the GGUF by its llama.cpp name
(``gguf_io.gguf_tensor_name``), dequantized to the model's dtype and put in place; the routed experts
stay on the meta device until the runtime's GGUF store takes them from the file, quantized. Rotary
embeddings (computed, not stored) are rebuilt on the host. llama.cpp stores the query and key
projections of ``llama``-architecture files (Mixtral) with their rows permuted for its rotary kernel;
they are permuted back (``gguf_io.permute_rope_rows``). A file without a tensor the model needs, or with
one of another size, is refused in one line naming it; so is a DeepSeek file converted by newer llama.cpp
with ``attn_kv_b`` split into ``attn_k_b`` / ``attn_v_b``, which is not read yet.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def has_weight_files(model_dir: str | Path) -> bool:
    """Whether the folder holds model weights (safetensors or torch files), not only config/tokenizer."""
    return any(p.suffix in WEIGHT_SUFFIXES for p in Path(model_dir).iterdir() if p.is_file())


def gguf_file(path: str | Path) -> Path:
    """``path``, or the one .gguf file in the folder ``path``."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("*.gguf"))
        if len(found) != 1:
            raise ValueError(f"--gguf-path {p} holds {len(found)} .gguf files; name the file")
        return found[0]
    if not p.is_file():
        raise ValueError(f"--gguf-path {p} does not exist")
    return p


def _expert_param_names(model: Any) -> set[str]:
    from hybrimoe_kt.kt.families import family_of, moe_blocks

    spec = family_of(model)
    names: set[str] = set()
    for layer, block in moe_blocks(model):
        experts = getattr(block, spec.experts_attr)
        prefix = f"model.layers.{layer}.{spec.mlp_attr}.{spec.experts_attr}."
        names.update(prefix + n for n, _ in experts.named_parameters())
    return names


def _rebuild_rotary(model: torch.nn.Module) -> None:
    """Rotary embedding modules hold computed buffers: build them again on the host."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding") and any(b.is_meta for b in module.buffers()):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            with torch.device("cpu"):
                fresh = type(module)(config=model.config)
            setattr(parent, name.rsplit(".", 1)[-1], fresh)


def _read(by_name: dict[str, Any], gname: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    from gguf import quants

    t = by_name.get(gname)
    if t is None:
        if gname.endswith("attn_kv_b.weight") and gname.replace("attn_kv_b", "attn_k_b") in by_name:
            raise ValueError(f"{where}: this GGUF splits attn_kv_b into attn_k_b / attn_v_b (newer llama.cpp "
                             f"conversions of DeepSeek models), which is not read yet")
        raise ValueError(f"{where}: the GGUF has no tensor {gname} (needed for the model's {shape} weight)")
    data = quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)  # a writable copy
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{where}: GGUF tensor {gname} holds {data.size} values, the model's weight is "
                         f"{shape} ({int(np.prod(shape))})")
    return data.reshape(shape)


def model_from_gguf(model_dir: str | Path, gguf_path: str | Path, dtype: torch.dtype = torch.bfloat16
                    ) -> tuple[Any, Any]:
    """(model in eval mode with its routed experts on the meta device, tokenizer)."""
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from hybrimoe_kt.kt.families import family_of
    from hybrimoe_kt.kt.gguf_io import gguf_tensor_name, permute_rope_rows

    model_dir, path = Path(model_dir), gguf_file(gguf_path)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    spec = family_of(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    _rebuild_rotary(model)
    reader = GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    experts = _expert_param_names(model)
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, param in list(model.named_parameters()):
        if name in experts or (tied and name == "lm_head.weight"):
            continue
        gname = gguf_tensor_name(name)
        data = _read(by_name, gname, tuple(param.shape), f"GGUF {path.name}")
        if spec.gguf_arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            data = permute_rope_rows(data, heads if gname.endswith("attn_q.weight") else kv_heads, inverse=True)
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[attr] = torch.nn.Parameter(torch.from_numpy(data).to(dtype),
                                                      requires_grad=False)
    for name, buf in list(model.named_buffers()):  # stored buffers (DeepSeek-V3's routing bias)
        gname = gguf_tensor_name(name)
        if buf.is_meta and gname in by_name:
            module_name, _, attr = name.rpartition(".")
            data = _read(by_name, gname, tuple(buf.shape), f"GGUF {path.name}")
            model.get_submodule(module_name)._buffers[attr] = torch.from_numpy(data).to(buf.dtype)
    if tied:
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta and n not in experts]
    left += [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise ValueError(f"GGUF {path.name}: cannot build {', '.join(left[:4])}{' ...' if len(left) > 4 else ''} "
                         f"from the file")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    log.info("built %s from %s (%d tensors; routed experts left to the GGUF store)", spec.name, path.name,
             len(by_name))
    return model, tokenizer


def experts_on_meta(model: torch.nn.Module) -> list[str]:
    """Parameters still on the meta device (routed experts no operator took over)."""
    return [n for n, p in model.named_parameters() if p.is_meta]
