"""Metrics of a replay, as printed in tables and written to JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from hybrimoe_kt.sim.engine import RunStats


@dataclass(frozen=True)
class Metrics:
    decode_tok_s: float
    decode_token_ms: float       # mean latency of one decode step
    decode_token_p50_ms: float
    decode_token_p90_ms: float
    prefill_tok_s: float
    hit_rate: float              # (hits + late hits) / activations, prefill included
    decode_hit_rate: float
    late_hit_rate: float         # late hits / activations
    pcie_gb: float
    cpu_busy_share: float
    gpu_busy_share: float
    copy_busy_share: float
    stall_s: float               # GPU time spent waiting for copies
    gpu_expert_share: float      # activated experts run on the GPU / all activated experts
    demand_loads: int
    background_copies: int
    streamed_loads: int          # demand loads that found no evictable slot (scratch buffer)
    decode_tokens: int
    prefill_tokens: int

    @staticmethod
    def from_stats(st: RunStats, time_scale: float = 1.0) -> "Metrics":
        """``time_scale`` extrapolates times when the trace recorded fewer layers than the model has."""
        dec_s = st.decode_s * time_scale
        pre_s = st.prefill_s * time_scale
        total = st.decode_s + st.prefill_s
        acc = st.hits + st.late_hits + st.misses
        dacc = st.decode_hits + st.decode_late_hits + st.decode_misses
        lat = np.asarray(st.token_latencies_s) * time_scale * 1e3
        steps = max(1, st.decode_steps)
        n_exp = st.gpu_experts + st.cpu_experts
        return Metrics(
            decode_tok_s=st.decode_tokens / dec_s if dec_s > 0 else 0.0,
            decode_token_ms=dec_s * 1e3 / steps if st.decode_steps else 0.0,
            decode_token_p50_ms=float(np.percentile(lat, 50)) if lat.size else 0.0,
            decode_token_p90_ms=float(np.percentile(lat, 90)) if lat.size else 0.0,
            prefill_tok_s=st.prefill_tokens / pre_s if pre_s > 0 else 0.0,
            hit_rate=(st.hits + st.late_hits) / acc if acc else 0.0,
            decode_hit_rate=(st.decode_hits + st.decode_late_hits) / dacc if dacc else 0.0,
            late_hit_rate=st.late_hits / acc if acc else 0.0,
            pcie_gb=st.bytes_copied / 1e9,
            cpu_busy_share=st.cpu_busy_s / total if total else 0.0,
            gpu_busy_share=st.gpu_busy_s / total if total else 0.0,
            copy_busy_share=st.copy_busy_s / total if total else 0.0,
            stall_s=st.stall_s * time_scale,
            gpu_expert_share=st.gpu_experts / n_exp if n_exp else 0.0,
            demand_loads=st.demand_loads,
            background_copies=st.background_copies,
            streamed_loads=st.streamed_loads,
            decode_tokens=st.decode_tokens,
            prefill_tokens=st.prefill_tokens,
        )

    def as_dict(self) -> dict:
        return {k: (round(v, 9) if isinstance(v, float) else v) for k, v in asdict(self).items()}
