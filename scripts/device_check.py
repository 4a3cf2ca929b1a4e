"""One device check for a machine with an NVIDIA GPU (also runs without one: ``--dry-run``).

Sections, each in its own try/except (an error is recorded in the JSON and the next section runs),
all under one global time budget:

- ``env``: torch/CUDA/GPU, triton, kt-kernel (the CPU tier falls back to the torch backend without it).
- ``numerics``: HybridMoE on the GPU tier vs a plain fp32 torch MoE for stock / static-frequency /
  hybrimoe (prefill then decode); ``gpu_experts_forward`` decode and prefill paths vs a per-slot
  reference; the Triton slot kernel when triton imports (CUDA only). Max relative errors.
- ``ab``: a stack of DeepSeek-V2-Lite-shaped MoE layers (random bf16 weights, routing replayed from a
  synthetic deepseek-v2-lite trace): stock vs static-frequency vs hybrimoe at 25% and 50% cache;
  prefill and decode time per layer (``torch.cuda.synchronize()`` only around timed forwards), decode
  hit rate, GB copied host-to-GPU, host overhead (decide + dispatch) per decode layer.

Without CUDA (or with ``--dry-run``) the GPU tier runs on device cpu (the CPU stand-in) with tiny
shapes; the JSON says so. Writes ``device_check.json`` under ``--out`` (default $OUT, else results/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent


def _import_package() -> str:
    """The installed package (``pip install -e .``); one line on stderr and exit 1 when it is missing."""
    try:
        import hybrimoe_kt.kernels  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name not in ("hybrimoe_kt", "hybrimoe_kt.kernels"):
            raise
        sys.exit(f"device_check: cannot import {e.name}: run `pip install -e .` in {REPO} first")
    return "installed package"


class Budget:
    def __init__(self, seconds: float) -> None:
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


def section(report: dict[str, Any], name: str, budget: Budget, fn: Callable[[], Any]) -> None:
    if budget.left() <= 0:
        report[name] = {"skipped": "global time budget spent"}
        return
    t0 = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as e:  # every failure is recorded; the next section still runs
        report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    if isinstance(report[name], dict):
        report[name]["section_s"] = round(time.perf_counter() - t0, 2)
    print(f"[{name}] done in {time.perf_counter() - t0:.1f} s", flush=True)


def env_info(device: str, cpu_backend: str) -> dict[str, Any]:
    import torch

    from hybrimoe_kt.kernels.cpu_backend import kt_kernel_available

    ok, detail = kt_kernel_available()
    info: dict[str, Any] = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
                            "gpu_tier_device": device, "kt_kernel": detail if ok else None,
                            "cpu_backend": cpu_backend}
    if not ok:
        info["cpu_backend_note"] = f"kt-kernel unusable ({detail}); the CPU tier uses the torch backend"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as e:
        info["triton"] = None
        info["triton_error"] = f"{type(e).__name__}: {e}"
    return info


def _reference(lw: Any, x: Any, ids: Any, w: Any) -> Any:
    """fp32 MoE: sum_k w[t,k] * down(silu(gate x) * up x), grouped by expert."""
    import torch
    import torch.nn.functional as F

    out = torch.zeros(x.shape[0], lw.gate.shape[2], dtype=torch.float32)
    xf = x.float().cpu()
    ids, w = ids.cpu(), w.cpu().float()
    for e in ids[ids >= 0].unique().tolist():
        rows, cols = (ids == e).nonzero(as_tuple=True)
        h = F.silu(xf[rows] @ lw.gate[e].float().T) * (xf[rows] @ lw.up[e].float().T)
        out.index_add_(0, rows, (h @ lw.down[e].float().T) * w[rows, cols].unsqueeze(1))
    return out


def _rel(got: Any, ref: Any) -> float:
    return float((got.float().cpu() - ref).norm() / ref.norm().clamp_min(1e-12))


def numerics(device: str, cpu_backend: str, dry: bool) -> dict[str, Any]:
    import numpy as np
    import torch

    from hybrimoe_kt.core.cost import RooflineCost
    from hybrimoe_kt.core.hardware import load_profile
    from hybrimoe_kt.core.models import ModelPreset
    from hybrimoe_kt.kernels.gpu_experts import gpu_experts_forward
    from hybrimoe_kt.kernels.slot_weights import SlotWeights
    from hybrimoe_kt.runtime.device import Tier
    from hybrimoe_kt.runtime.moe import HybridMoE
    from hybrimoe_kt.runtime.store import HostExpertStore

    L, E, K, H, I = (3, 8, 2, 64, 128) if dry else (3, 16, 4, 512, 256)
    res: dict[str, Any] = {"shape": {"layers": L, "experts": E, "top_k": K, "hidden": H, "inter": I}}
    tier = Tier(device)
    res["tier"] = tier.label
    store = HostExpertStore.random(L, E, H, I, seed=0, pin=tier.is_cuda)
    model = ModelPreset("check", "none", L, 0, E, K, 0, H, I, 0, 4 * H * H, 1000)
    cost = RooflineCost.build(load_profile("rtx4090-ddr5"), model, "bf16", "bf16")
    gen = torch.Generator().manual_seed(0)
    counts = np.arange(L * E, dtype=np.int64).reshape(L, E) % 5
    moe_err: dict[str, float] = {}
    for strategy, slots in (("stock", 0), ("static-frequency", 3 * L), ("hybrimoe", 3)):
        moe = HybridMoE(store, tier, strategy, slots, cost, K, counts=counts, cpu_backend=cpu_backend,
                        cpu_threads=1 if dry else None)
        worst = 0.0
        for n in (12, 1, 1, 3, 1):
            for layer in range(L):
                x = torch.randn(n, H, generator=gen).to(torch.bfloat16)
                logits = torch.randn(n, E, generator=gen)
                w, ids = torch.softmax(logits, -1).topk(K, dim=-1)
                w = w / w.sum(-1, keepdim=True)
                with torch.no_grad():
                    got = moe.forward(layer, x.to(tier.device), ids.to(tier.device), w.to(tier.device))
                worst = max(worst, _rel(got, _reference(store.layers[layer], x, ids, w)))
        moe_err[strategy] = round(worst, 6)
    res["hybrid_moe_max_rel_err"] = moe_err
    # slot kernels: decode / prefill paths and Triton vs the same reference
    slots = SlotWeights.allocate(E, H, I, "bf16", tier.device)
    lw = store.layers[0]
    for s in range(E):
        slots.write_slot(s, lw.gate[s], lw.up[s], lw.down[s])
    paths: dict[str, float] = {}
    for n in (1, 4, 64):
        x = torch.randn(n, H, generator=gen).to(torch.bfloat16)
        logits = torch.randn(n, E, generator=gen)
        w, ids = torch.softmax(logits, -1).topk(K, dim=-1)
        ids[0, -1] = -1  # one pair served elsewhere
        ref = _reference(lw, x, ids, torch.where(ids >= 0, w, 0.0))
        xd, idd, wd = x.to(tier.device), ids.to(tier.device, torch.int32), w.to(tier.device)
        active = sorted(set(ids[ids >= 0].tolist()))
        paths[f"decode_n{n}"] = round(_rel(gpu_experts_forward(xd, idd, wd, slots, active, path="decode"),
                                           ref), 6)
        paths[f"prefill_n{n}"] = round(_rel(gpu_experts_forward(xd, idd, wd, slots, path="prefill"), ref), 6)
        if tier.is_cuda:
            try:
                from hybrimoe_kt.kernels.triton_experts import triton_available, triton_experts_forward
                if triton_available(tier.device):
                    paths[f"triton_n{n}"] = round(_rel(triton_experts_forward(xd, idd, wd, slots, active),
                                                       ref), 6)
                else:
                    res["triton"] = "not available on this device"
            except Exception as e:
                res["triton_error"] = f"{type(e).__name__}: {e}"
        else:
            res["triton"] = "skipped on the CPU stand-in (CUDA only here; interpreter mode is tested in CI)"
    res["gpu_experts_max_rel_err"] = paths
    res["worst"] = max(list(moe_err.values()) + list(paths.values()))
    return res


def ab(device: str, cpu_backend: str, dry: bool, budget: Budget, layers: int, decode_steps: int) -> dict[str, Any]:
    import gc

    import numpy as np
    import torch

    from hybrimoe_kt.core.cost import RooflineCost
    from hybrimoe_kt.core.hardware import load_profile
    from hybrimoe_kt.core.strategies import get_strategy, slots_for
    from hybrimoe_kt.kernels.cpu_backend import default_threads, make_cpu_backend
    from hybrimoe_kt.kernels.cpu_ktkernel import CpuWorkerPool
    from hybrimoe_kt.runtime.device import Tier
    from hybrimoe_kt.runtime.harness import StackShape, random_store, run_replay, summary_us
    from hybrimoe_kt.runtime.moe import HybridMoE
    from hybrimoe_kt.runtime.replay import RoutingReplay
    from hybrimoe_kt.traces.synthetic import synthetic_trace

    tier = Tier(device)
    shape = StackShape("deepseek-v2-lite", layers, 256 if dry else 2048, 128 if dry else 1408)
    prompt = 16 if dry else 64
    trace = synthetic_trace(shape.model, n_requests=1, prompt_len=prompt, decode_len=decode_steps, seed=0,
                            n_layers=layers)
    counts = synthetic_trace(shape.model, n_requests=2, prompt_len=prompt, decode_len=decode_steps,
                             seed=1000, n_layers=layers).expert_counts()
    replay = RoutingReplay(trace, shape.model)
    cost = RooflineCost.build(load_profile("rtx4090-ddr5"), shape.preset(), "bf16", "bf16")
    t0 = time.perf_counter()
    store = random_store(shape, seed=0, pin=tier.is_cuda, device=tier.device if tier.is_cuda else None)
    threads = 1 if dry else None
    workers = CpuWorkerPool(threads or default_threads())  # one kt-kernel pool for all layers, as the runtime
    backends = [make_cpu_backend(cpu_backend, lw.gate, lw.up, lw.down, workers.n_threads, top_k=shape.top_k,
                                 max_len=512, pool=workers, layer_idx=i) for i, lw in enumerate(store)]
    res: dict[str, Any] = {"tier": tier.label, "label": f"{tier.label}; random bf16 weights; {replay.label}",
                           "shape": shape.describe(), "cpu_backend": backends[0].name,
                           "setup_s": round(time.perf_counter() - t0, 1), "runs": []}
    prefill, decode = replay.steps("prefill"), replay.steps("decode")
    runs = [("stock", 0.0)] + [(s, r) for r in (0.25, 0.5) for s in ("static-frequency", "hybrimoe")]
    for strategy, ratio in runs:
        if budget.left() < 20:
            res["runs"].append({"strategy": strategy, "cache_ratio": ratio, "skipped": "time budget"})
            continue
        try:
            spec = get_strategy(strategy)
            moe = HybridMoE(store, tier, spec, slots_for(spec, layers, shape.n_experts, ratio), cost,
                            shape.top_k, counts=counts, cpu_backends=backends)
            run_replay(moe, replay, decode[:2], seed=7, timed=False)  # warm-up (allocator, kernels)
            c0, b0 = moe.cache.counters, moe.pool.bytes_copied
            pre = run_replay(moe, replay, prefill, seed=1)
            h0, m0 = c0.hits + c0.late_hits, c0.misses
            dec = run_replay(moe, replay, decode, seed=2)
            c = moe.cache.counters
            acc = (c.hits + c.late_hits - h0) + (c.misses - m0)
            row = {"strategy": strategy, "cache_ratio": ratio, "slots": moe.cache.capacity,
                   "prefill_ms_per_layer": round(1e3 * sum(pre.forward_s) / layers, 3),
                   "prefill_tokens": sum(pre.forward_tokens),
                   "decode_ms_per_layer": summary_us([f / layers for f in dec.forward_s]),
                   "decode_hit_rate": round((c.hits + c.late_hits - h0) / acc, 4) if acc else 0.0,
                   "gb_copied": round((moe.pool.bytes_copied - b0) / 1e9, 4),
                   "host_overhead_per_decode_layer": summary_us(dec.layer_host_s),
                   "gpu_experts": moe.stats.gpu_experts, "cpu_experts": moe.stats.cpu_experts}
            del moe
        except Exception as e:
            row = {"strategy": strategy, "cache_ratio": ratio, "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()[-2000:]}
        gc.collect()
        if tier.is_cuda:
            torch.cuda.empty_cache()
        res["runs"].append(row)
        print(f"  {strategy:17s} cache {ratio:.2f}: " + ", ".join(
            f"{k}={v}" for k, v in row.items() if k not in ("strategy", "cache_ratio", "traceback")), flush=True)
    res["decode_tokens"] = len(decode)
    res["note"] = "counts for placement come from a second synthetic trace (seed 1000), never the replayed one"
    del np
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU stand-in with tiny shapes (no GPU needed)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "results"))
    ap.add_argument("--budget-s", type=float, default=420.0, help="global time budget")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--decode-steps", type=int, default=None)
    args = ap.parse_args(argv)
    report: dict[str, Any] = {"import": _import_package()}
    budget = Budget(args.budget_s)

    import torch

    from hybrimoe_kt.kernels.cpu_backend import kt_kernel_available
    from hybrimoe_kt.measure.provenance import provenance

    cuda = torch.cuda.is_available() and not args.dry_run
    device = "cuda" if cuda else "cpu"
    dry = not cuda
    if dry:
        torch.set_num_threads(1)
    cpu_backend = "kt-kernel" if kt_kernel_available()[0] else "torch"
    report.update(provenance(mode="cuda" if cuda else "dry-run (CPU stand-in for the GPU tier, tiny shapes)"))
    layers = args.layers or (2 if dry else 8)
    steps = args.decode_steps or (4 if dry else 48)
    section(report, "env", budget, lambda: env_info(device, cpu_backend))
    section(report, "numerics", budget, lambda: numerics(device, cpu_backend, dry))
    section(report, "ab", budget, lambda: ab(device, cpu_backend, dry, budget, layers, steps))
    report["wall_s"] = round(time.perf_counter() - budget.t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "device_check.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    print(f"wrote {path} ({report['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
