"""Load a Hugging Face MoE model folder and turn it into a hybrid model with a rule file.

``load_hybrid(model_dir, rules_path)``: the model (weights from safetensors, offline), the optimize
rules applied in place, and the shared HybriMoE runtime attached. The result is a plain transformers
model whose routed experts run through the runtime; ``generate`` works as usual.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from hybrimoe_kt.kt.inject import InjectionReport, apply_rules
from hybrimoe_kt.kt.rules import load_rules
from hybrimoe_kt.kt.runtime_attach import attach_runtime

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


def load_hybrid(model_dir: str | Path, rules_path: str | Path, dtype: Optional[torch.dtype] = None,
                progress: bool = True, overrides: Optional[Mapping[str, Any]] = None,
                gguf_path: Optional[str | Path] = None) -> HybridModel:
    """``overrides``: runtime settings that replace the rule kwargs, e.g. ``{"cpu_threads": 4}``.
    ``gguf_path``: routed experts from this GGUF file (quantized on the CPU tier); the rest of the
    weights, the config and the tokenizer come from ``model_dir``."""
    from hybrimoe_kt.kt.tiny import load_model

    t0 = time.perf_counter()
    rules = load_rules(rules_path)  # validate the rule file before the (slow) model load
    steps = ["load weights", "apply rules", "build runtime"]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(steps), desc="loading", unit="step", leave=False)
    model, tokenizer = load_model(model_dir, dtype=dtype)
    if bar is not None:
        bar.update(1)
    report = apply_rules(model, rules, config=model.config)
    if bar is not None:
        bar.update(1)
    runtime = attach_runtime(model, overrides=overrides, gguf_path=gguf_path)
    if bar is not None:
        bar.update(1)
        bar.close()
    return HybridModel(model, tokenizer, runtime, report, str(rules_path), time.perf_counter() - t0)
