"""Metrics of a replay, as printed in tables and written to JSON.

Per-request latencies come from ``RunStats.steps`` (request id, is_prefill, rows, seconds), grouped by
request id in replay order; steps with request -1 (a log without request ids) are left out of them.
A batched step carries its batch's first request id and stands for every request of the batch (its
rows at the first decode step), so each of them is weighted by that count. Definitions:
  - TTFT of a request: its prefill time (all chunks) plus its first decode step. The trace's first
    decode row is the first generated token fed back, so this ends when the second token is out:
    one decode step later than a server would stamp it (conservative, the same for every strategy).
  - TPOT: mean time of a request's decode steps after the first, averaged over requests.
  - cold / warm decode tok/s: the first ``COLD_TOKENS`` decode steps of each request vs the rest.
  - bandwidth bound (REFERENCE.md section 5): the weight bytes a decode step must read at the
    replay's decode hit rate, priced by the cost model's memory times (``bandwidth_bound_s``).
All values are sums in replay order, so equal inputs give byte-identical JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

from hybrimoe_kt.core.cost import RooflineCost
from hybrimoe_kt.sim.engine import RunStats

COLD_TOKENS = 64  # decode steps per request that count as cold (cache warming up)


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
    stage_copies: int            # layer-streaming prefill: copies into the staging buffers
    stage_used: int              # staged experts the GPU computed
    prefill_layer_modes: dict    # prefill layer calls by mode: stream / split / cpu (all routed on the CPU)
                                 # / layerwise (the whole layer copied to the GPU, core.layerwise)
    layerwise_copies: int        # experts copied into the full-layer buffer (layer-wise prefill)
    replaced: int                # GPU experts re-placed from a batch after a layer-wise call
    decode_tokens: int
    prefill_tokens: int
    ttft_ms: Optional[float]             # mean over requests (None without request ids or decode)
    ttft_p90_ms: Optional[float]
    tpot_ms: Optional[float]             # mean over requests of their decode steps after the first
    cold_decode_tok_s: Optional[float]   # first COLD_TOKENS decode steps of each request
    warm_decode_tok_s: Optional[float]   # the rest (None when requests are that short)
    pcie_gb_per_decode_token: float      # copies issued during decode steps / decode tokens
    bandwidth_bound_tok_s: Optional[float]         # tiers read concurrently (a true upper bound)
    bandwidth_bound_serial_tok_s: Optional[float]  # tiers read one after another (REFERENCE.md 5 table)
    bandwidth_bound_fraction: Optional[float]      # decode_tok_s / bandwidth_bound_tok_s, <= 1

    @staticmethod
    def from_stats(st: RunStats, time_scale: float = 1.0, cost: Optional[RooflineCost] = None,
                   free_transfers: bool = False) -> "Metrics":
        """``time_scale`` extrapolates times when the trace recorded fewer layers than the model has;
        ``cost`` (the replay's cost model) enables the bandwidth bound, ``free_transfers`` prices
        copies at zero in it (for strategies that replay with free transfers)."""
        dec_s = st.decode_s * time_scale
        pre_s = st.prefill_s * time_scale
        total = st.decode_s + st.prefill_s
        acc = st.hits + st.late_hits + st.misses
        dacc = st.decode_hits + st.decode_late_hits + st.decode_misses
        lat = np.asarray(st.token_latencies_s) * time_scale * 1e3
        steps = max(1, st.decode_steps)
        n_exp = st.gpu_experts + st.cpu_experts
        req = request_latencies(st.steps, time_scale)
        bound = serial = frac = None
        if cost is not None and st.decode_steps and st.steps and st.moe_layer_calls:
            layers = st.moe_layer_calls / len(st.steps)  # simulated MoE layers per step
            calls = st.decode_steps * layers
            hits = (st.decode_hits + st.decode_late_hits) / calls
            misses = st.decode_misses / calls
            args = (cost, hits, misses, layers * time_scale, free_transfers)
            b_s, s_s = bandwidth_bound_s(*args), bandwidth_bound_s(*args, overlap=False)
            bound = st.decode_tokens / (st.decode_steps * b_s)
            serial = st.decode_tokens / (st.decode_steps * s_s)
            frac = st.decode_steps * b_s / dec_s if dec_s > 0 else None
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
            stage_copies=st.stream_copies,
            stage_used=st.stream_used,
            prefill_layer_modes={"stream": st.prefill_layers_stream, "split": st.prefill_layers_split,
                                 "cpu": st.prefill_layers_cpu, "layerwise": st.prefill_layers_layerwise},
            layerwise_copies=st.layerwise_copies,
            replaced=st.replaced,
            decode_tokens=st.decode_tokens,
            prefill_tokens=st.prefill_tokens,
            ttft_ms=req[0], ttft_p90_ms=req[1], tpot_ms=req[2],
            cold_decode_tok_s=req[3], warm_decode_tok_s=req[4],
            pcie_gb_per_decode_token=(st.decode_bytes_copied / 1e9 / st.decode_tokens
                                      if st.decode_tokens else 0.0),
            bandwidth_bound_tok_s=bound, bandwidth_bound_serial_tok_s=serial,
            bandwidth_bound_fraction=frac,
        )

    def as_dict(self) -> dict:
        return {k: (round(v, 9) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def request_latencies(steps: Sequence[tuple[int, bool, int, float]], time_scale: float = 1.0
                      ) -> tuple[Optional[float], ...]:
    """(TTFT mean ms, TTFT p90 ms, TPOT mean ms, cold tok/s, warm tok/s) from per-step records; None
    where no request defines the value (see the module docstring)."""
    streams: dict[int, list[tuple[bool, int, float]]] = {}
    for req, pre, rows, sec in steps:
        if req >= 0:
            streams.setdefault(req, []).append((pre, rows, sec))
    ttft: list[float] = []
    ttft_w: list[int] = []
    tpot: list[float] = []
    tpot_w: list[int] = []
    tok = [0, 0]      # cold, warm decode tokens
    sec = [0.0, 0.0]  # cold, warm decode seconds
    for recs in streams.values():
        prefill = [s for pre, _, s in recs if pre]
        decode = [(r, s) for pre, r, s in recs if not pre]
        if not decode:
            continue
        n_req = decode[0][0]
        if prefill:
            ttft.append((sum(prefill) + decode[0][1]) * time_scale * 1e3)
            ttft_w.append(n_req)
        if len(decode) > 1:
            tpot.append(sum(s for _, s in decode[1:]) / (len(decode) - 1) * time_scale * 1e3)
            tpot_w.append(n_req)
        for i, (r, s) in enumerate(decode):
            warm = int(i >= COLD_TOKENS)
            tok[warm] += r
            sec[warm] += s * time_scale
    ttft_a = np.repeat(np.asarray(ttft), ttft_w)
    return (
        float(ttft_a.mean()) if ttft_a.size else None,
        float(np.percentile(ttft_a, 90)) if ttft_a.size else None,
        float(np.average(tpot, weights=tpot_w)) if tpot else None,
        tok[0] / sec[0] if sec[0] > 0 else None,
        tok[1] / sec[1] if sec[1] > 0 else None,
    )


def bandwidth_bound_s(cost: RooflineCost, hits: float, misses: float, n_moe_layers: float,
                      free_transfers: bool = False, overlap: bool = True) -> float:
    """Least time of one decode step from weight reads alone, at ``hits`` / ``misses`` activated
    routed experts per MoE layer (batch 1: top-k x hit rate; batched: the distinct experts).

    Every MoE layer reads its attention weights first (``attn_mem``); a hit reads VRAM
    (``gpu_mem``), a miss is read by the CPU from DRAM (``cpu_mem``) or copied (``transfer_s``, 0 with
    free transfers) and read on the GPU; shared experts read VRAM; dense layers and the LM head read
    ``extra_mem`` once. ``overlap=False`` adds the tiers up, each miss at min(cpu_mem, transfer +
    gpu_mem): the formula of REFERENCE.md section 5, which the simulated (and real) CPU and GPU tiers
    beat by running at the same time, so it is not a bound on them. ``overlap=True`` (the default)
    lets the CPU, the GPU and the copy queue run concurrently and picks the best split (misses move to
    the CPU first, then hits): per layer max(CPU reads, GPU reads, copies), minimised over the split.
    That is a lower bound on any schedule's step time (compute and overheads only add, and by
    convexity it holds for averages over layers), so achieved / bound <= 1."""
    c, g = cost.cpu_mem, cost.gpu_mem
    t = 0.0 if free_transfers else cost.transfer_s
    sh = cost.shared_mem
    if not overlap:
        moe = hits * g + misses * min(c, t + g) + sh
    else:
        total = hits + misses

        def span(z: float) -> float:  # z experts on the CPU (misses first), the rest on the GPU
            return max(c * z, sh + g * (total - z), t * max(0.0, misses - z))

        cands = [0.0, misses, total, (sh + g * total) / (c + g) if c + g > 0 else 0.0,
                 t * misses / (c + t) if c + t > 0 else 0.0]
        moe = min(span(min(max(z, 0.0), total)) for z in cands)
    return n_moe_layers * (cost.attn_mem + moe) + cost.extra_mem
