"""Fit a tier's roofline to measured per-expert times (numpy only).

Model, as the cost model uses it: t(n) = expert_overhead + max(bytes / mem_bw, n * flops_per_token /
throughput), for one expert serving n tokens. The fit minimises the squared *relative* error over all
samples (times span orders of magnitude, and a decode-sized call matters as much as a prefill-sized
one): a log-spaced grid over (mem_bw, throughput), refined twice around the best point, with the
overhead solved in closed form (weighted mean of the residual, clamped at 0) at every grid point.

When no sample is memory bound under the fitted throughput (the kernel is compute bound already at one
token) the bandwidth is not identifiable: every value above ``bytes * throughput / flops_per_token``
predicts the same times. The fit then reports that lower bound raised to the machine's measured read
bandwidth when given (``mem_bw_source`` says which), so predictions for the measured shape are unchanged
and other weight formats get a physical bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True, slots=True)
class ExpertSample:
    """Time of one expert (call time minus call overhead, divided by experts per call)."""

    bytes: float            # weight bytes of one expert
    flops_per_token: float  # 2 * 3 * H * I for a SiLU-gated expert
    tokens: int
    seconds: float

    def __post_init__(self) -> None:
        if not (self.bytes > 0 and self.flops_per_token > 0 and self.tokens >= 1):
            raise ValueError(f"invalid sample {self}: bytes, flops_per_token > 0 and tokens >= 1 needed")


@dataclass(frozen=True, slots=True)
class TierFit:
    mem_bw_gbs: float
    tflops: float
    expert_overhead_us: float
    mem_bw_source: str            # "fit", "compute-bound lower bound", "machine read bandwidth"
    rel_rms: float                # root-mean-square relative error over the samples

    def predict(self, samples: Sequence[ExpertSample]) -> np.ndarray:
        b, f, n, _ = _arrays(samples)
        return (self.expert_overhead_us * 1e-6
                + np.maximum(b / (self.mem_bw_gbs * 1e9), n * f / (self.tflops * 1e12)))


def _arrays(samples: Sequence[ExpertSample]) -> tuple[np.ndarray, ...]:
    b = np.array([s.bytes for s in samples], dtype=np.float64)
    f = np.array([s.flops_per_token for s in samples], dtype=np.float64)
    n = np.array([s.tokens for s in samples], dtype=np.float64)
    t = np.array([s.seconds for s in samples], dtype=np.float64)
    return b, f, n, t


def _best_on_grid(bw: np.ndarray, tf: np.ndarray, b: np.ndarray, f: np.ndarray, n: np.ndarray,
                  t: np.ndarray) -> tuple[float, float, float, float]:
    """(loss, bw, tf, overhead) minimising the relative squared error over the grid bw x tf."""
    mem = b[None, None, :] / bw[:, None, None]                       # [Gb, 1, S]
    cmp = (n * f)[None, None, :] / tf[None, :, None]                 # [1, Gt, S]
    m = np.maximum(mem, cmp)                                         # [Gb, Gt, S]
    w = 1.0 / t**2                                                   # [S]
    o = np.clip(((t - m) * w).sum(-1) / w.sum(), 0.0, None)          # [Gb, Gt]
    loss = ((((o[..., None] + m) - t) / t) ** 2).sum(-1)             # [Gb, Gt]
    i, j = np.unravel_index(int(np.argmin(loss)), loss.shape)
    return float(loss[i, j]), float(bw[i]), float(tf[j]), float(o[i, j])


def fit_tier(samples: Sequence[ExpertSample], read_bw_gbs: float | None = None,
             grid: int = 160) -> TierFit:
    """Least-squares (relative) roofline fit. ``read_bw_gbs``: measured streaming read bandwidth."""
    if len(samples) < 2:
        raise ValueError(f"need at least 2 samples to fit a tier, got {len(samples)}")
    b, f, n, t = _arrays(samples)
    if not (t > 0).all():
        raise ValueError("every sample needs a positive time; measure with more repeats")
    # bandwidth / throughput that would explain each sample alone, widened both ways
    bw_lo, bw_hi = (b / t).min() / 4, (b / t).max() * 1e3
    tf_lo, tf_hi = (n * f / t).min() / 4, (n * f / t).max() * 4
    bw = np.geomspace(bw_lo, bw_hi, grid)
    tf = np.geomspace(tf_lo, tf_hi, grid)
    loss, best_bw, best_tf, o = _best_on_grid(bw, tf, b, f, n, t)
    for _ in range(3):  # refine around the best point
        sb, st = (bw[1] / bw[0]) ** 2, (tf[1] / tf[0]) ** 2
        bw = np.geomspace(best_bw / sb, best_bw * sb, grid // 4)
        tf = np.geomspace(best_tf / st, best_tf * st, grid // 4)
        cand = _best_on_grid(bw, tf, b, f, n, t)
        if cand[0] <= loss:
            loss, best_bw, best_tf, o = cand
    mem = b / best_bw
    cmp = n * f / best_tf
    source = "fit"
    if not (mem > cmp).any():
        # bandwidth unidentified: smallest value keeping every sample compute bound
        lower = float((b * best_tf / f).max())
        best_bw, source = lower, "compute-bound lower bound"
        if read_bw_gbs is not None and read_bw_gbs * 1e9 > lower:
            best_bw, source = read_bw_gbs * 1e9, "machine read bandwidth"
    pred = o + np.maximum(b / best_bw, n * f / best_tf)
    rel_rms = float(np.sqrt(np.mean(((pred - t) / t) ** 2)))
    return TierFit(mem_bw_gbs=best_bw / 1e9, tflops=best_tf / 1e12, expert_overhead_us=o * 1e6,
                   mem_bw_source=source, rel_rms=rel_rms)
