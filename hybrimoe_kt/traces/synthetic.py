"""Seeded synthetic routing traces with the locality of real MoE routers.

Each token's router logits at layer l are the sum of
  - a per-layer popularity bias (log-normal popularity, ``popularity_sigma``: skew across experts),
  - a per-request preference that drifts over tokens (AR(1) with correlation ``drift_rho``, scale
    ``request_sigma``: per-request hot sets),
  - a bonus ``stickiness`` for the experts the previous token of the request chose at this layer
    (temporal reuse),
  - a bonus ``affinity`` for the fixed successors (a random permutation per layer pair) of the experts
    this token chose at layer l-1 (inter-layer affinity),
  - Gumbel noise of scale ``temperature`` (prompt tokens: ``prefill_temperature``, and the stickiness
    bonus times ``prefill_stickiness``, so prefill touches most experts).
The top-k logits are the chosen experts (highest first); weights are their softmax renormalised over
the top-k, stored as float16. Only ``numpy.random.Generator(seed)`` is used, so a seed fixes the trace.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Optional, Union

import numpy as np

from hybrimoe_kt.core.models import ModelPreset, get_model
from hybrimoe_kt.traces.format import Trace


@dataclass(frozen=True)
class SyntheticParams:
    """Knobs of the synthetic router (see the module docstring)."""

    popularity_sigma: float = 0.5
    request_sigma: float = 0.5
    drift_rho: float = 0.97
    stickiness: float = 1.0
    affinity: float = 0.5
    temperature: float = 1.0
    prefill_temperature: float = 1.5
    prefill_stickiness: float = 0.8

    def __post_init__(self) -> None:
        for name in ("popularity_sigma", "request_sigma", "stickiness", "affinity", "prefill_stickiness"):
            if getattr(self, name) < 0:
                raise ValueError(f"SyntheticParams.{name}={getattr(self, name)} must be >= 0")
        for name in ("temperature", "prefill_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SyntheticParams.{name}={getattr(self, name)} must be > 0")
        if not 0 <= self.drift_rho <= 1:
            raise ValueError(f"SyntheticParams.drift_rho={self.drift_rho} must be in [0, 1]")


_SHARED = SyntheticParams(popularity_sigma=0.5, request_sigma=2.0, drift_rho=0.95, stickiness=0.1,
                          affinity=0.5, temperature=1.0, prefill_temperature=2.5)

# Calibrated against REFERENCE.md section 6 and the real traces (see tests/traces/test_synthetic.py):
# Mixtral: reuse at t+1 ~0.38, LRU hit ~0.38/0.62 at 2/4 slots; Qwen3-30B-A3B: ~45% repeat at t+1,
# ~80% within 8 tokens, LRU with 40% resident ~0.9 after warm-up. Models with shared experts
# (DeepSeek, Qwen1.5/Qwen2) get less locality.
SYNTHETIC_PRESETS: Mapping[str, SyntheticParams] = {
    "mixtral-8x7b": SyntheticParams(popularity_sigma=0.35, request_sigma=0.3, drift_rho=0.9,
                                    stickiness=0.55, affinity=0.6, temperature=1.0),
    "qwen3-30b-a3b": SyntheticParams(popularity_sigma=0.6, request_sigma=3.0, drift_rho=0.98,
                                     stickiness=0.1, affinity=0.8, temperature=1.0,
                                     prefill_temperature=2.5),
    "olmoe-1b-7b": SyntheticParams(popularity_sigma=0.6, request_sigma=2.8, drift_rho=0.98,
                                   stickiness=0.1, affinity=0.8, temperature=1.0,
                                   prefill_temperature=2.5),
    "qwen2-57b-a14b": _SHARED,
    "qwen1.5-moe-a2.7b": _SHARED,
    "deepseek-v2-lite": _SHARED,
    "deepseek-v3": _SHARED,
}


def params_for(model: ModelPreset) -> SyntheticParams:
    """The preset for ``model``; unknown models get the shared-expert or no-shared-expert default."""
    if model.name in SYNTHETIC_PRESETS:
        return SYNTHETIC_PRESETS[model.name]
    return SYNTHETIC_PRESETS["deepseek-v3" if model.n_shared_experts else "qwen3-30b-a3b"]


def _softmax_topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids (highest first) and their softmax weights renormalised over the top-k, per row."""
    part = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(logits, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    ids = np.take_along_axis(part, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    w = np.exp(vals - vals[:, :1])
    return ids, w / w.sum(axis=1, keepdims=True)


def synthetic_trace(model: Union[ModelPreset, str], n_requests: int = 4, prompt_len: int = 64,
                    decode_len: int = 128, seed: int = 0, params: Optional[SyntheticParams] = None,
                    n_layers: Optional[int] = None) -> Trace:
    """A routing trace of ``n_requests`` requests, each ``prompt_len`` prefill tokens (one forward)
    followed by ``decode_len`` decode tokens, for the MoE layers of ``model`` (or its first
    ``n_layers`` MoE layers)."""
    preset = get_model(model) if isinstance(model, str) else model
    p = params if params is not None else params_for(preset)
    if n_requests < 1 or prompt_len < 0 or decode_len < 0 or prompt_len + decode_len < 1:
        raise ValueError(f"need n_requests >= 1 and prompt_len + decode_len >= 1, got n_requests="
                         f"{n_requests}, prompt_len={prompt_len}, decode_len={decode_len}")
    n_l = preset.n_moe_layers if n_layers is None else n_layers
    if not 1 <= n_l <= preset.n_moe_layers:
        raise ValueError(f"n_layers={n_layers} must be in 1..{preset.n_moe_layers} for {preset.name}")
    e, k, r, n_tok = preset.n_experts, preset.top_k, n_requests, prompt_len + decode_len
    rng = np.random.Generator(np.random.PCG64(seed))
    base = rng.normal(0.0, p.popularity_sigma, size=(n_l, e))
    succ = np.stack([rng.permutation(e) for _ in range(n_l)])  # succ[l][e]: successor at layer l
    pref = rng.normal(size=(r, n_l, e))
    experts = np.empty((r, n_tok, n_l, k), dtype=np.int16)
    weights = np.empty((r, n_tok, n_l, k), dtype=np.float16)
    prev = np.zeros((r, n_l, e))  # indicator of the previous token's experts per layer
    rows = np.arange(r)[:, None]
    innov = np.sqrt(1.0 - p.drift_rho ** 2)
    for t in range(n_tok):
        prefill = t < prompt_len
        temp = p.prefill_temperature if prefill else p.temperature
        stick = p.stickiness * (p.prefill_stickiness if prefill else 1.0)
        pref = p.drift_rho * pref + innov * rng.normal(size=pref.shape)
        gumbel = rng.gumbel(size=(r, n_l, e))
        aff = np.zeros((r, e))
        cur = np.zeros((r, n_l, e))
        for layer in range(n_l):
            logits = (base[layer] + p.request_sigma * pref[:, layer] + stick * prev[:, layer]
                      + p.affinity * aff + temp * gumbel[:, layer])
            ids, w = _softmax_topk(logits, k)
            experts[:, t, layer] = ids
            weights[:, t, layer] = w
            cur[rows, layer, ids] = 1.0
            aff = np.zeros((r, e))
            if layer + 1 < n_l:
                aff[rows, succ[layer][ids]] = 1.0
        prev = cur
    meta = {
        "model": preset.name, "n_layers": n_l, "n_experts": e, "top_k": k,
        "n_shared_experts": preset.n_shared_experts,
        "weights_meaning": "synthetic: softmax over the top-k logits (renormalised, sum to 1)",
        "source": f"synthetic_trace(seed={seed}, n_requests={r}, prompt_len={prompt_len}, "
                  f"decode_len={decode_len}, params={p})",
        "licence": "generated by hybrimoe-kt (project licence)",
    }
    return Trace(experts=experts.reshape(r * n_tok, n_l, k), weights=weights.reshape(r * n_tok, n_l, k),
                 seq_id=np.repeat(np.arange(r, dtype=np.int32), n_tok),
                 pos=np.tile(np.arange(n_tok, dtype=np.int32), r),
                 is_prefill=np.tile(np.arange(n_tok) < prompt_len, r), metadata=meta)


def with_params(name: str, **changes: float) -> SyntheticParams:
    """The preset of model ``name`` with some fields changed (for calibration sweeps)."""
    return replace(params_for(get_model(name)), **changes)


def as_batched(trace: Trace) -> Trace:
    """The trace as a continuous-batching log: each request's prompt is one step, then step d holds
    the d-th decode token of every request; request ids are dropped (-1), as in batched serving logs."""
    steps: list[np.ndarray] = []
    for s in trace.requests():
        rows = np.flatnonzero((trace.seq_id == s) & trace.is_prefill)
        if rows.size:
            steps.append(rows)
    decode = [np.flatnonzero((trace.seq_id == s) & ~trace.is_prefill) for s in trace.requests()]
    for d in range(max((r.size for r in decode), default=0)):
        steps.append(np.array([r[d] for r in decode if d < r.size]))
    order = np.concatenate(steps)
    step = np.concatenate([np.full(r.size, i, dtype=np.int32) for i, r in enumerate(steps)])
    minus = np.full(order.size, -1, dtype=np.int32)
    return Trace(experts=trace.experts[order], seq_id=minus, pos=minus, is_prefill=trace.is_prefill[order],
                 metadata=trace.metadata, step=step,
                 weights=None if trace.weights is None else trace.weights[order],
                 valid=trace.valid[order], layer_ids=trace.layer_ids)
