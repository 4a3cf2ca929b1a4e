"""Stand-ins of classic kTransformers for the classic adapter's tests, installed as a fake ``ktransformers``
package in ``sys.modules`` (``install``). Written for these tests from kT's documented contract, not
copied: ``BaseInjectedModule`` keeps ``orig_module`` and sends unknown attribute names to it (reads and
writes, as kT's does), ``KExpertsBase`` is abstract in ``forward`` / ``load`` / ``unload``,
``InferenceState`` and ``Config().cpu_infer`` exist, and the classes the classic rule files name exist
with kT's module paths (v0.3.x-v0.4.x). ``KQwen2MoeSparseMoeBlock`` follows kT's control flow: experts
through ``submit_for_one_decode`` / ``sync_for_one_decode`` around the shared expert in decode, else
through ``self.experts(x, ids, w)`` when the experts are a ``KExpertsBase``.

``GgufLoaderStandIn`` is kT's GGUF loader as the adapter uses it: ``tensor_info[name]`` with the ggml
type id and GGUF-order shape, and ``get_mmap_tensor(name)`` returning a flat read-only byte slice of one
buffer (the file mapping), built from this package's own GGUF quantizer.
"""

from __future__ import annotations

import abc
import enum
import importlib.machinery
import sys
import types
from typing import Any

import numpy as np
import pytest
import torch

from hybrimoe_kt.kernels.gguf_experts import GgufLayerExperts, GgufTensor, ggml_type_id


class BaseInjectedModule(torch.nn.Module):
    def __init__(self, key: str, gguf_loader: Any, config: Any, orig_module: torch.nn.Module,
                 prefill_device: str = "cuda", generate_device: str = "cuda", **kwargs: Any) -> None:
        torch.nn.Module.__init__(self)
        torch.nn.Module.__setattr__(self, "orig_module", orig_module)
        for name, value in (("key", key), ("gguf_loader", gguf_loader), ("config", config),
                            ("prefill_device", prefill_device), ("generate_device", generate_device),
                            ("device", generate_device)):
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        if name == "orig_module":
            return torch.nn.Module.__getattr__(self, "orig_module")
        return getattr(torch.nn.Module.__getattr__(self, "orig_module"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "orig_module":
            torch.nn.Module.__setattr__(self, name, value)
        elif hasattr(self, name):
            object.__setattr__(self, name, value)
        else:  # kT's trap: a new name lands on the wrapped module
            setattr(torch.nn.Module.__getattr__(self, "orig_module"), name, value)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.orig_module.forward(*args, **kwargs)

    def load(self) -> None:
        pass


class KExpertsBase(abc.ABC):
    def __init__(self, key: str, gguf_loader: Any, config: Any, orig_module: Any, device: str = "cuda",
                 **kwargs: Any) -> None:
        self.key, self.gguf_loader, self.config, self.device = key, gguf_loader, config, device

    @abc.abstractmethod
    def forward(self, input_tensor, expert_ids, weights): ...

    @abc.abstractmethod
    def load(self, w=None, device="cpu", warmup=False): ...

    @abc.abstractmethod
    def unload(self): ...


class InferenceState(enum.Enum):
    UNLOAD = 0
    PREFILL = 1
    GENERATE = 2


class KQwen2MoeSparseMoeBlock(BaseInjectedModule):
    """kT's Qwen2-MoE block operator's routing of the experts call (router: softmax top-k)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        b, t, h = hidden.shape
        x = hidden.view(-1, h)
        w, ids = torch.softmax(self.gate(x).float(), dim=-1).topk(self.top_k, dim=-1)
        w = w.to(x.dtype)
        if t == 1 and hasattr(self.experts.generate_experts, "submit_for_one_decode"):
            self.experts.generate_experts.submit_for_one_decode(x[0], ids[0], w[0])
            shared = self.shared_expert(x)
            y = self.experts.generate_experts.sync_for_one_decode().unsqueeze(0)
            y += shared
            return y.view(b, t, h)
        assert isinstance(self.experts, KExpertsBase)
        y = self.experts(x.to(self.experts.device), ids.to(self.experts.device), w.to(self.experts.device))
        return (y.to(hidden.device) + self.shared_expert(x)).view(b, t, h)


class Config:
    cpu_infer = 0


# modules and class names the classic rule files name (kT v0.3.x-v0.4.x)
MODELING = {
    "ktransformers.models.modeling_deepseek": ["DeepseekV2MoE", "DeepseekV2YarnRotaryEmbedding"],
    "ktransformers.models.modeling_deepseek_v3": ["DeepseekV3MoE", "DeepseekV3RotaryEmbedding", "MoEGate"],
    "ktransformers.models.modeling_qwen2_moe": ["Qwen2MoeSparseMoeBlock", "Qwen2MoeRotaryEmbedding"],
    "ktransformers.models.modeling_qwen3_moe": ["Qwen3MoeSparseMoeBlock", "Qwen3MoeRMSNorm", "Qwen3MoeMLP"],
    "ktransformers.models.modeling_mixtral": ["MixtralSparseMoeBlock", "MixtralRotaryEmbedding"],
}
OPERATORS = {
    "ktransformers.operators.experts": ["KDeepseekV2MoE", "KDeepseekV3MoE", "KQwen3MoeSparseMoeBlockV2",
                                        "KMistralSparseMoEBlock"],
    "ktransformers.operators.RoPE": ["YarnRotaryEmbedding", "YarnRotaryEmbeddingV3", "RotaryEmbedding"],
    "ktransformers.operators.linear": ["KTransformersLinear"],
    "ktransformers.operators.attention": ["KDeepseekV2Attention"],
    "ktransformers.operators.balance_serve_attention": ["KQwen3MoeAttention"],
    "ktransformers.operators.models": ["KDeepseekV2Model", "KQwen2MoeModel"],
    "ktransformers.operators.gate": ["KMoEGate"],
    "ktransformers.operators.layernorm": ["KQwen3MoeRMSNorm"],
    "ktransformers.operators.mlp": ["KQwen2MoeMLP"],
}
PACKAGES = ["ktransformers", "ktransformers.models", "ktransformers.operators", "ktransformers.util",
            "ktransformers.server", "ktransformers.server.config"]


def _module(name: str, package: bool = False) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        mod.__path__ = []
    return mod


def install(monkeypatch: pytest.MonkeyPatch, cpu_infer: int = 0) -> dict[str, types.ModuleType]:
    """Put the fake ``ktransformers`` in ``sys.modules`` (undone by ``monkeypatch``); returns its modules.
    ``cpu_infer``: ``Config().cpu_infer`` (0: unset, as kT's default file would not give)."""
    mods = {n: _module(n, package=True) for n in PACKAGES}
    base = mods["ktransformers.operators.base_operator"] = _module("ktransformers.operators.base_operator")
    base.BaseInjectedModule = BaseInjectedModule
    utils = mods["ktransformers.util.utils"] = _module("ktransformers.util.utils")
    utils.InferenceState = InferenceState
    conf = mods["ktransformers.server.config.config"] = _module("ktransformers.server.config.config")
    conf.Config = type("Config", (Config,), {"cpu_infer": cpu_infer})
    for table, parent in ((MODELING, torch.nn.Module), (OPERATORS, BaseInjectedModule)):
        for mod_name, names in table.items():
            mod = mods.setdefault(mod_name, _module(mod_name))
            for n in names:
                setattr(mod, n, type(n, (parent,), {"__module__": mod_name}))
    experts = mods["ktransformers.operators.experts"]
    experts.KExpertsBase, experts.KQwen2MoeSparseMoeBlock = KExpertsBase, KQwen2MoeSparseMoeBlock
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return mods


class GgufLoaderStandIn:
    """kT's GGUF loader: ``tensor_info`` and ``get_mmap_tensor`` over one read-only byte buffer."""

    def __init__(self, tensors: dict[str, GgufTensor | tuple[str, tuple[int, ...], np.ndarray]]) -> None:
        self.tensor_info: dict[str, dict[str, Any]] = {}
        chunks, offset = [], 0
        for name, t in tensors.items():
            type_name, shape, data = (t.type_name, t.shape, t.data) if isinstance(t, GgufTensor) else t
            raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
            self.tensor_info[name] = {"ggml_type": ggml_type_id(type_name), "shape": list(reversed(shape)),
                                      "offset": offset, "nbytes": raw.size}
            chunks.append(raw)
            offset += raw.size
        self.buffer = np.concatenate(chunks)
        self.buffer.flags.writeable = False
        self.reads = 0

    def get_mmap_tensor(self, name: str) -> np.ndarray:
        self.reads += 1
        t = self.tensor_info[name]
        return self.buffer[t["offset"]: t["offset"] + t["nbytes"]]


def fused_loader(layers: dict[int, GgufLayerExperts]) -> GgufLoaderStandIn:
    """GGUF names ``blk.<i>.ffn_{gate,up,down}_exps.weight``."""
    return GgufLoaderStandIn({f"blk.{i}.ffn_{p}_exps.weight": getattr(lx, p)
                              for i, lx in layers.items() for p in ("gate", "up", "down")})


def per_expert_loader(layers: dict[int, GgufLayerExperts]) -> GgufLoaderStandIn:
    """Older Mixtral files: ``blk.<i>.ffn_{gate,up,down}.<e>.weight``, one tensor per expert."""
    tensors = {}
    for i, lx in layers.items():
        for p in ("gate", "up", "down"):
            t = getattr(lx, p)
            for e in range(lx.n_experts):
                tensors[f"blk.{i}.ffn_{p}.{e}.weight"] = (t.type_name, t.shape[1:], t.data[e])
    return GgufLoaderStandIn(tensors)
