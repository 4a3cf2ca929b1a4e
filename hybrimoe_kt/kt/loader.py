"""Load a Hugging Face MoE model folder and turn it into a hybrid model with a rule file.

``load_hybrid(model_dir, rules_path)``: the model (weights from safetensors, offline), the optimize
rules applied in place, and the shared HybriMoE runtime attached. The result is a plain transformers
model whose routed experts run through the runtime; ``generate`` works as usual.

Devices: every module that is not a routed expert (embeddings, attention, norms, routers, shared
experts, the LM head) goes to the rules' ``generate_device``; the routed experts stay in host memory
(the runtime's host store) and reach the GPU tier only through its slot pool. One device serves prefill
and generate for now: a rule file whose ``prefill_device`` differs is refused at load.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from hybrimoe_kt.kt.gguf_weights import experts_on_meta, has_weight_files, model_from_gguf
from hybrimoe_kt.kt.inject import InjectionReport, apply_rules
from hybrimoe_kt.kt.rules import Rule, RuleError, load_rules
from hybrimoe_kt.kt.runtime_attach import attach_runtime
from hybrimoe_kt.runtime.device import real_host

log = logging.getLogger(__name__)


@dataclass
class HybridModel:
    model: Any
    tokenizer: Any
    runtime: Any               # HybridMoE, or None when the rules replace no experts
    report: InjectionReport
    rules_path: str
    load_s: float

    @property
    def tier_label(self) -> str:
        return self.runtime.label if self.runtime is not None else "no HybriMoE operator"


def rules_device(rules: Sequence[Rule], default: str = "cpu") -> torch.device:
    """The one device the rules place the model on: their ``generate_device`` (``default`` when no rule
    names one). RuleError when a rule's ``prefill_device`` differs from its ``generate_device`` or two
    rules name different devices: one device for prefill and generate is supported for now."""
    from hybrimoe_kt.runtime.device import resolve_device

    found: dict[torch.device, str] = {}
    for r in rules:
        gen = r.kwargs.get("generate_device")
        pre = r.kwargs.get("prefill_device")
        if gen is None and pre is None:
            continue
        g = resolve_device(str(gen if gen is not None else default))
        p = resolve_device(str(pre if pre is not None else default))
        if g != p:
            raise RuleError(f"{r.where()}: prefill_device {pre!r} differs from generate_device {gen!r}; one "
                            f"device for prefill and generate is supported for now: give both the same device")
        found.setdefault(g, r.where())
    if len(found) > 1:
        listed = "; ".join(f"{d} ({w})" for d, w in found.items())
        raise RuleError(f"the rules name {len(found)} devices ({listed}); one device for the whole model is "
                        f"supported for now: give every rule the same generate_device and prefill_device")
    return next(iter(found)) if found else resolve_device(default)


def place_model(model: torch.nn.Module, device: torch.device) -> None:
    """Move every parameter and buffer still in the module tree to ``device``: everything but the routed
    experts, whose weights the runtime's host store took out of the tree (they stay in host memory)."""
    if device.type == "cpu":
        return  # the CPU stand-in: the model was loaded there
    model.to(device)
    log.info("model placed on %s (routed experts in host memory)", device)


def load_hybrid(model_dir: str | Path, rules_path: str | Path, dtype: Optional[torch.dtype] = None,
                progress: bool = True, overrides: Optional[Mapping[str, Any]] = None,
                gguf_path: Optional[str | Path] = None) -> HybridModel:
    """``overrides``: runtime settings that replace the rule kwargs, e.g. ``{"cpu_threads": 4}``.
    ``gguf_path``: routed experts from this GGUF file (quantized on the CPU tier); the rest of the
    weights, the config and the tokenizer come from ``model_dir``."""
    from hybrimoe_kt.kt.tiny import load_model

    t0 = time.perf_counter()
    rules = load_rules(rules_path)  # validate the rule file before the (slow) model load
    device = rules_device(rules)
    steps = ["load weights", "apply rules", "build runtime"]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(steps), desc="loading", unit="step", leave=False)
    from_gguf = gguf_path is not None and not has_weight_files(model_dir)
    if gguf_path is None and Path(model_dir).is_dir() and not has_weight_files(model_dir):
        raise ValueError(f"{model_dir} holds no weight files (safetensors): pass --gguf-path with the model's "
                         f"GGUF file to read every weight from it")
    with real_host():  # weights are read into host memory (real tensors even under FakeTensorMode)
        if from_gguf:  # kTransformers' invocation: config and tokenizer here, every weight in the GGUF
            model, tokenizer = model_from_gguf(model_dir, gguf_path, dtype or torch.bfloat16)
        else:
            model, tokenizer = load_model(model_dir, dtype=dtype)
        if bar is not None:
            bar.update(1)
        report = apply_rules(model, rules, config=model.config, strict=False)  # unmatched: a warning, as in kT
    if bar is not None:
        bar.update(1)
    left = experts_on_meta(model) if from_gguf else []
    if left:
        raise RuleError(f"{rules_path}: with every weight from the GGUF the rules must hand every routed expert "
                        f"to the hybrid runtime (an experts or MoE-block operator); {left[0]} is left unread")
    place_model(model, device)  # before the runtime, whose GPU memory check counts what is there
    runtime = attach_runtime(model, overrides=overrides, gguf_path=gguf_path)
    if bar is not None:
        bar.update(1)
        bar.close()
    return HybridModel(model, tokenizer, runtime, report, str(rules_path), time.perf_counter() - t0)
