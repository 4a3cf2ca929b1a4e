"""Record routing traces from Hugging Face transformers MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE,
DeepSeek-V2/V3, OLMoE). torch and transformers are imported inside functions only.

In transformers 5.x every family's router is a ``.gate`` submodule of the MoE block (the block has an
``experts`` attribute) whose forward returns ``(logits, top-k weights, top-k indices)``. A router
that returns only logits is handled too: the recorder takes the softmax top-k of the logits.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional, Sequence

import numpy as np

from hybrimoe_kt.traces.format import Trace

log = logging.getLogger(__name__)


def _config_int(config: Any, *names: str, default: Optional[int] = None) -> Optional[int]:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return default


class RoutingRecorder:
    """Forward hooks on every MoE router of ``model``; collects top-k ids and weights per call."""

    def __init__(self, model: Any) -> None:
        self.model = model
        config = model.config
        self.top_k = _config_int(config, "num_experts_per_tok", "moe_topk", "top_k")
        self.n_experts = _config_int(config, "num_local_experts", "num_experts", "n_routed_experts")
        self.routers: list[tuple[str, Any]] = []
        for name, module in model.named_modules():
            parent_name = name.rsplit(".", 1)[0] if "." in name else ""
            if name.endswith(".gate") and hasattr(model.get_submodule(parent_name), "experts"):
                self.routers.append((name, module))
        if not self.routers:
            raise ValueError(f"model {type(model).__name__} has no MoE router ('.gate' submodule of a "
                             f"block with 'experts'); the recorder supports transformers MoE families")
        self.layer_ids = [int(m.group(1)) if (m := re.search(r"layers\.(\d+)\.", n)) else i
                          for i, (n, _) in enumerate(self.routers)]
        self.calls: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in self.routers]
        self._handles: list[Any] = []

    def _hook(self, index: int):
        def hook(module: Any, inputs: Any, output: Any) -> None:
            import torch

            if isinstance(output, (tuple, list)) and len(output) >= 3:
                weights, ids = output[1], output[2]
            else:
                logits = output[0] if isinstance(output, (tuple, list)) else output
                if self.top_k is None:
                    raise ValueError("router returns only logits and the config has no "
                                     "num_experts_per_tok; cannot infer top-k")
                weights, ids = torch.topk(logits.float().softmax(dim=-1), self.top_k, dim=-1)
            ids = ids.detach().reshape(-1, ids.shape[-1]).cpu().numpy()
            weights = weights.detach().float().reshape(-1, weights.shape[-1]).cpu().numpy()
            order = np.argsort(-weights, axis=1, kind="stable")  # router order: highest weight first
            self.calls[index].append((np.take_along_axis(ids, order, axis=1),
                                      np.take_along_axis(weights, order, axis=1)))
        return hook

    def __enter__(self) -> "RoutingRecorder":
        self._handles = [m.register_forward_hook(self._hook(i)) for i, (_, m) in enumerate(self.routers)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def reset(self) -> None:
        self.calls = [[] for _ in self.routers]

    def take(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Rows recorded since the last reset: ids [T, L, K], weights [T, L, K], rows per forward."""
        sizes = [c[0].shape[0] for c in self.calls[0]]
        for name_calls, (name, _) in zip(self.calls, self.routers):
            if [c[0].shape[0] for c in name_calls] != sizes:
                raise RuntimeError(f"router {name} saw different forwards than {self.routers[0][0]}")
        ids = np.stack([np.concatenate([c[0] for c in calls]) for calls in self.calls], axis=1)
        w = np.stack([np.concatenate([c[1] for c in calls]) for calls in self.calls], axis=1)
        self.reset()
        return ids, w, sizes


def record_trace(model: Any, prompts: Sequence[Any], max_new_tokens: int = 16, tokenizer: Any = None,
                 model_name: Optional[str] = None, source: str = "hybrimoe-kt record") -> Trace:
    """Run greedy ``model.generate`` once per prompt and return the routing of every MoE layer.

    ``prompts`` are strings (needs ``tokenizer``) or token-id sequences. Each prompt is one request:
    the first forward (the prompt) is prefill, the following one-token forwards are decode.
    """
    import torch

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not prompts:
        raise ValueError("no prompts given; pass at least one prompt")
    rec = RoutingRecorder(model)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    with rec, torch.no_grad():
        for seq, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                if tokenizer is None:
                    raise ValueError("text prompts need a tokenizer; pass tokenizer= or token ids")
                input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            else:
                input_ids = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1)
            if input_ids.shape[1] < 1:
                raise ValueError(f"prompt {seq} is empty")
            model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                           max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=getattr(model.config, "pad_token_id", None) or 0)
            ids, w, sizes = rec.take()
            pre = np.zeros(ids.shape[0], dtype=bool)
            if sizes and sizes[0] > 1:
                pre[:sizes[0]] = True
            parts.append((ids, w, pre))
            log.debug("request %d: %d forwards, %d token rows", seq, len(sizes), ids.shape[0])
    config = model.config
    k = parts[0][0].shape[2]
    meta = {
        "model": model_name or getattr(config, "_name_or_path", "") or config.model_type,
        "model_type": config.model_type,
        "n_layers": len(rec.routers),
        "n_experts": rec.n_experts or int(max(p[0].max() for p in parts)) + 1,
        "top_k": k,
        "n_shared_experts": _config_int(config, "n_shared_experts", default=None)
        if _config_int(config, "n_shared_experts") is not None
        else int(bool(_config_int(config, "shared_expert_intermediate_size", default=0))),
        "weights_meaning": "top-k routing weights as the model's MoE block applies them "
                           "(family-specific normalisation and scaling)",
        "source": source,
        "licence": "recorded locally; same terms as the model and prompts used",
        "max_new_tokens": max_new_tokens,
    }
    n = [p[0].shape[0] for p in parts]
    return Trace(experts=np.concatenate([p[0] for p in parts]),
                 weights=np.concatenate([p[1] for p in parts]),
                 seq_id=np.repeat(np.arange(len(parts), dtype=np.int32), n),
                 pos=np.concatenate([np.arange(m, dtype=np.int32) for m in n]),
                 is_prefill=np.concatenate([p[2] for p in parts]),
                 layer_ids=np.asarray(rec.layer_ids, dtype=np.int16), metadata=meta)
