"""What a simulation takes when it is not told: the strategies, the trace, the model preset of a trace.

Shared by ``hybrimoe-kt simulate`` and ``ab`` (``commands/``), the A/B projection (``kt.ab_compare``)
and the scripts, so none of them imports the command-line layer for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from hybrimoe_kt.core.models import MODEL_PRESETS, ModelPreset

DEFAULT_STRATEGIES = "stock,static-frequency,lru-offload,hybrimoe-paper,hybrimoe-layer,hybrimoe,oracle,roofline"
REAL_MIXTRAL = "mixtral-8x7b-instruct__speculative-moe"


def shared_traces_dir() -> Optional[Path]:
    """``../shared/traces`` beside the repository (or the working directory), when present."""
    from hybrimoe_kt.measure.provenance import REPO_ROOT

    for base in (REPO_ROOT, Path.cwd()):
        d = base.parent / "shared" / "traces"
        if d.is_dir():
            return d
    return None


def default_trace() -> str:
    d = shared_traces_dir()
    if d is not None and (d / f"{REAL_MIXTRAL}.npz").is_file():
        return str(d / REAL_MIXTRAL)
    return "synthetic:mixtral-8x7b"


def infer_model(trace_model: str, n_layers: int, n_experts: int, top_k: int) -> ModelPreset:
    """The preset a trace belongs to: by name first, else by shape (experts, top-k, depth)."""
    if trace_model in MODEL_PRESETS:
        return MODEL_PRESETS[trace_model]
    fits = [m for m in MODEL_PRESETS.values()
            if m.n_experts == n_experts and m.top_k == top_k and m.n_moe_layers >= n_layers]
    exact = [m for m in fits if m.n_moe_layers == n_layers]
    pick = exact or fits
    if len(pick) != 1:
        raise ValueError(f"cannot tell which model preset the trace ({n_experts} experts, top-{top_k}, "
                         f"{n_layers} layers) belongs to; pass --model (one of {', '.join(MODEL_PRESETS)})")
    return pick[0]
