"""One device check for a machine with an NVIDIA GPU (also runs without one: ``--dry-run``).

Sections, in this order, each in its own try/except (an error is recorded in the JSON and the next
section runs), all under one global time budget. The JSON is rewritten after every section, every
chat family and every A/B run, so a run stopped by the outer timeout keeps what it measured.

- ``env``: torch/CUDA/GPU, triton, kt-kernel (the CPU tier falls back to the torch backend without it).
- ``numerics``: HybridMoE on the GPU tier vs a plain fp32 torch MoE for stock / static-frequency /
  hybrimoe (prefill then decode); ``gpu_experts_forward`` decode and prefill paths vs a per-slot
  reference; the Triton slot kernel when triton imports (CUDA only). Max relative errors. GGUF slots per
  type (``measure.slot_numerics``), and the pinned GGUF store: page-locked blocks, asynchronous slot
  copies (CUDA only).
- ``chat``: end-to-end generation with a tiny random model of every family (``kt.tiny``, fixed seed, in
  a temporary folder) loaded with its stock and its hybrimoe rule file (a copy saying
  ``generate_device: cuda`` on the GPU; the files as they are, ``cpu``, on the CPU stand-in; the static
  rules need calibration counts and are left out): 16 greedy tokens with the eager decode loop
  (``cuda_graph=False``) and with the CUDA-graph decoder (``cuda_graph=True``: captured once, replayed;
  on the stand-in ``"eager"``, the same step function uncaptured). Per family x rules x mode: tokens,
  decode tok/s, the decoder's graph mode, the GPU/CPU expert split and hit rate; per family x rules the
  tier and whether the graph tokens equal the eager ones (on a GPU a near-tie may flip a greedy token:
  recorded, not failed; on the stand-in the two are the same computation and must be equal). Every
  family x rules pair is in its own try/except.
- ``ab``: a stack of DeepSeek-V2-Lite-shaped MoE layers (random bf16 weights, routing replayed from a
  synthetic deepseek-v2-lite trace): stock vs static-frequency vs hybrimoe at 25% and 50% cache;
  prefill and decode time per layer (``torch.cuda.synchronize()`` only around timed forwards), decode
  hit rate, GB copied host-to-GPU, host overhead (decide + dispatch) per decode layer. Decode is
  measured twice per run, each time on a fresh runtime after the same warm-up and prefill:
  ``decode_eager`` (graph off: layer by layer, ``run_replay``) and ``decode_graph`` (graph on: one
  decode step over every layer of the stack - static input and routing buffers, the runtime's
  graph-safe layers under ``HybridMoE.graph_step`` - captured in one CUDA graph after two warm-up steps
  on a side stream; per step the routing is copied into the static buffers, ``begin_forward`` runs the
  upkeep outside the graph, then ``replay``). Both give decode tok/s (1 / mean step time, synchronised
  around each step) and host time per layer (eager: upkeep + decide + dispatch; graph: upkeep + the
  ``replay()`` call, unsynchronised), and ``graph_speedup`` = eager / graph mean step time. ``graph``
  says which: ``replayed``, ``unsupported: <reason>`` (``runtime.graph_decode.graph_unsupported``, e.g.
  no triton or no kt-kernel), ``capture failed: ...``, or on the stand-in ``eager (CPU stand-in, no
  capture)`` (the same step function run uncaptured, so the structure is exercised in CI).

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
    except Exception as e:  # every failure is recorded (with what the section had saved); the next runs
        err = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        partial = report.get(name)
        report[name] = {**partial, **err} if isinstance(partial, dict) else err
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


def numerics(device: str, cpu_backend: str, dry: bool) -> dict[str, Any]:
    import numpy as np
    import torch

    from hybrimoe_kt.core.cost import RooflineCost
    from hybrimoe_kt.core.hardware import load_profile
    from hybrimoe_kt.core.models import ModelPreset
    from hybrimoe_kt.kernels.gpu_experts import gpu_experts_forward
    from hybrimoe_kt.kernels.slot_weights import SlotWeights
    from hybrimoe_kt.measure.slot_numerics import reference_moe, rel_err
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
                worst = max(worst, rel_err(got, reference_moe(store.layers[layer], x, ids, w)))
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
        ref = reference_moe(lw, x, ids, torch.where(ids >= 0, w, 0.0))
        xd, idd, wd = x.to(tier.device), ids.to(tier.device, torch.int32), w.to(tier.device)
        active = sorted(set(ids[ids >= 0].tolist()))
        paths[f"decode_n{n}"] = round(rel_err(gpu_experts_forward(xd, idd, wd, slots, active, path="decode"),
                                              ref), 6)
        paths[f"prefill_n{n}"] = round(rel_err(gpu_experts_forward(xd, idd, wd, slots, path="prefill"), ref), 6)
        if tier.is_cuda:
            try:
                from hybrimoe_kt.kernels.triton_experts import triton_available, triton_experts_forward
                if triton_available(tier.device):
                    paths[f"triton_n{n}"] = round(rel_err(triton_experts_forward(xd, idd, wd, slots, active),
                                                          ref), 6)
                else:
                    res["triton"] = "not available on this device"
            except Exception as e:
                res["triton_error"] = f"{type(e).__name__}: {e}"
        else:
            res["triton"] = "skipped on the CPU stand-in (CUDA only here; interpreter mode is tested in CI)"
    res["gpu_experts_max_rel_err"] = paths
    res["gguf_slots_max_rel_err"] = gguf_slot_numerics(tier)
    res["gguf_pinned_store"] = gguf_pinned_store(tier)
    res["worst"] = max(list(moe_err.values()) + list(paths.values()))
    return res


def gguf_slot_numerics(tier: Any) -> dict[str, Any]:
    """GGUF slots (raw blocks on the device): the torch path and, on CUDA, the Triton kernel against a
    reference on the store's dequantized weights (``measure.slot_numerics``), per type, for a decode row
    and a 16-row batch: ``<type>_<path>_n<rows>`` -> ||got - ref|| / ||ref||."""
    from hybrimoe_kt.measure.slot_numerics import gguf_slot_numerics as measure

    out: dict[str, Any] = {}
    for t, row in measure(tier.device, token_counts=(1, 16)).items():
        if isinstance(row, dict) and "torch" in row:
            for path in ("torch", "triton"):
                for n, r in row.get(path, {}).get("tokens", {}).items():
                    out[f"{t}_{path}_n{n}"] = r["rel_err"]
    return out


def gguf_pinned_store(tier: Any) -> dict[str, Any]:
    """The GGUF store's pinned layout (``GgufExpertStore(pin=True)``) on CUDA: the blocks a slot copy reads
    are page-locked, the store's host bytes are the experts' bytes, and a copy issued with
    ``non_blocking=True`` on the copy stream returns before it completes and lands the bytes unchanged."""
    if not tier.is_cuda:
        return {"skipped": "page-locked host memory needs CUDA (the CPU stand-in keeps the blocks pageable)"}
    import torch

    from hybrimoe_kt.kernels.gguf_experts import GgufExperts, GgufLayerExperts
    from hybrimoe_kt.runtime.store_gguf import GgufExpertStore

    e_n, h, i = 4, 2048, 768  # Qwen3-30B-A3B's routed expert
    gen = torch.Generator().manual_seed(3)
    g, u = (torch.randn(e_n, i, h, generator=gen) * h ** -0.5 for _ in range(2))
    d = torch.randn(e_n, h, i, generator=gen) * i ** -0.5
    experts = GgufExperts({0: GgufLayerExperts.quantize(g, u, d, ("Q4_K", "Q4_K", "Q6_K"))})
    mapped_bytes = sum(t.data.nbytes for t in (experts.layer(0).gate, experts.layer(0).up, experts.layer(0).down))
    store = GgufExpertStore(experts, pin=True)
    slots = store.make_slots(1, tier.device)
    timings = []
    for e in range(e_n):  # the first copy is a warm-up
        torch.cuda.synchronize()
        with tier.copying():
            t0 = time.perf_counter()
            slots.write_blocks(0, *store.expert_blocks(0, e), non_blocking=True)
            issued = time.perf_counter() - t0
            done = tier.record_on_copy()
        done.synchronize()
        timings.append((issued * 1e6, (time.perf_counter() - t0) * 1e6))
    _, blocks = store.expert_blocks(0, e_n - 1)
    return {"blocks_pinned": all(b.is_pinned() for b in blocks),
            "host_bytes_over_expert_bytes": round(store.quantized_bytes() / mapped_bytes, 4),
            "bytes_per_expert": sum(b.numel() for b in blocks),
            "bytes_equal": all(torch.equal(s[0, :, : b.shape[1]].cpu(), b) for s, b in zip(slots.data, blocks)),
            "copy_issue_us": round(min(t[0] for t in timings[1:]), 1),
            "copy_done_us": round(min(t[1] for t in timings[1:]), 1),
            "method": f"{e_n} experts of {i} x {h} (gate/up Q4_K, down Q6_K); best of {e_n - 1} copies after "
                      f"a warm-up: issue = write_blocks(non_blocking=True) on the copy stream, done = until "
                      f"its event completes"}


CHAT_PROMPT = "Hello! Tell me a short story about a fox."
CHAT_TOKENS = 16
CHAT_SEED = 2
CHAT_RULES = ("stock", "hybrimoe")  # the static rules need calibration counts (placement_counts)
RULE_NAMES = {"mixtral": "Mixtral", "qwen2-moe": "Qwen2-MoE", "qwen3-moe": "Qwen3-MoE",
              "deepseek-v2": "DeepSeek-V2", "deepseek-v3": "DeepSeek-V3", "olmoe": "OLMoE"}
GRAPH_STAND_IN = "eager (CPU stand-in, no capture)"
GRAPH_WARMUP_STEPS = 2  # eager steps on a side stream before the capture (allocator, Triton compile)


def _error(e: BaseException, limit: int = 2000) -> dict[str, str]:
    return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-limit:]}


def _free_device(cuda: bool) -> None:
    import gc

    gc.collect()
    if cuda:
        import torch
        torch.cuda.empty_cache()


def rules_for(family: str, kind: str, device: str, tmp: Path) -> Path:
    """The family's ``kind`` rule file; for a CUDA run a copy whose devices say ``cuda`` (prefill and
    generate: the loader refuses rules whose two devices differ)."""
    src = REPO / "optimize_rules" / f"{RULE_NAMES[family]}-{kind}.yaml"
    if device == "cpu":
        return src
    text = src.read_text()
    for key in ("generate_device", "prefill_device"):
        text = text.replace(f"{key}: cpu", f"{key}: {device}")
    if f"generate_device: {device}" not in text:
        raise ValueError(f"{src}: no 'generate_device: cpu' line to point at {device}")
    dst = tmp / f"{src.stem}-{device}.yaml"
    dst.write_text(text)
    return dst


def _generation_row(r: Any, load_s: float) -> dict[str, Any]:
    s = r.summary()
    return {"tokens": list(r.tokens), "new_tokens": r.new_tokens, "prompt_tokens": r.prompt_tokens,
            "decode_tok_s": s["decode_tok_s"], "prefill_s": s["prefill_s"], "cuda_graph": r.cuda_graph,
            "gpu_experts": s["gpu_experts"], "cpu_experts": s["cpu_experts"], "hit_rate": s["hit_rate"],
            "forwards": s["forwards"], "hits": s["hits"], "misses": s["misses"], "gb_copied": s["gb_copied"],
            "load_s": round(load_s, 3)}


COUNTER_KEYS = ("forwards", "gpu_experts", "cpu_experts", "hits", "misses")


def chat_pair(model_dir: str, rules: Path, graph_request: Any, overrides: Any, cuda: bool) -> dict[str, Any]:
    """One family x rules: a fresh load per decode mode (the same starting cache), 16 greedy tokens."""
    import torch

    from hybrimoe_kt.kt.generation import encode_prompt as encode
    from hybrimoe_kt.kt.generation import generate
    from hybrimoe_kt.kt.loader import load_hybrid

    row: dict[str, Any] = {"rules": rules.name, "modes": {}}
    for label, mode in (("off", False), ("graph", graph_request)):
        hm = None
        try:
            t0 = time.perf_counter()
            hm = load_hybrid(model_dir, rules, progress=False, overrides=overrides)
            load_s = time.perf_counter() - t0
            row.setdefault("tier", hm.tier_label)
            row.setdefault("strategy", hm.runtime.spec.name if hm.runtime is not None else None)
            ids = encode(hm.tokenizer, [], CHAT_PROMPT, True)
            with torch.no_grad():
                r = generate(hm, ids, CHAT_TOKENS, stop_on_eos=False, cuda_graph=mode)
            row["modes"][label] = _generation_row(r, load_s)
        except Exception as e:  # recorded; the other mode and the other pairs still run
            row["modes"][label] = _error(e)
        finally:
            del hm
            _free_device(cuda)
    off, graph = row["modes"]["off"], row["modes"]["graph"]
    if "tokens" in off and "tokens" in graph:
        a, b = off["tokens"], graph["tokens"]
        row["graph_tokens_equal"] = a == b
        if a != b:
            row["first_token_diff"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        row["graph_counters_equal"] = all(off[k] == graph[k] for k in COUNTER_KEYS)
    return row


def chat(device: str, dry: bool, budget: Budget, chat_budget_s: float, report: dict[str, Any],
         save: Callable[[], None]) -> dict[str, Any]:
    import tempfile

    from hybrimoe_kt.kt.families import FAMILIES
    from hybrimoe_kt.kt.tiny import make_tiny_model

    cuda = device != "cpu"
    graph_request: Any = True if cuda else "eager"
    res: dict[str, Any] = {"prompt": CHAT_PROMPT, "max_new_tokens": CHAT_TOKENS, "seed": CHAT_SEED,
                           "rules_device": device, "rules": list(CHAT_RULES),
                           "graph_request": graph_request, "families": {},
                           "note": "greedy decoding; the eager loop (cuda_graph=False) vs the CUDA-graph decoder "
                                   "(captured and replayed on CUDA; 'eager' on the CPU stand-in: the same step "
                                   "function uncaptured). On a GPU a near-tie may flip a greedy token (recorded, "
                                   "not failed); no logits are compared"}
    report["chat"] = res
    overrides = {"cpu_threads": 1} if dry else None
    stop = time.perf_counter() + chat_budget_s
    with tempfile.TemporaryDirectory(prefix="device_check_chat_") as tmp:
        for family in FAMILIES:
            fam: dict[str, Any] = {}
            res["families"][family] = fam
            if time.perf_counter() > stop or budget.left() < 30:
                fam["skipped"] = "chat time budget"
                continue
            t0 = time.perf_counter()
            try:
                model_dir = make_tiny_model(family, Path(tmp) / family, seed=CHAT_SEED)["dir"]
            except Exception as e:
                fam.update(_error(e))
                continue
            for kind in CHAT_RULES:
                try:
                    fam[kind] = chat_pair(model_dir, rules_for(family, kind, device, Path(tmp)), graph_request,
                                          overrides, cuda)
                except Exception as e:
                    fam[kind] = _error(e)
            fam["family_s"] = round(time.perf_counter() - t0, 2)
            print(f"  {family:12s} " + ", ".join(
                f"{k}: {v.get('modes', {}).get('graph', {}).get('cuda_graph', v.get('error'))} "
                f"equal={v.get('graph_tokens_equal')}" for k, v in fam.items() if isinstance(v, dict)), flush=True)
            save()
    pairs = [v for f in res["families"].values() for v in f.values() if isinstance(v, dict)]
    compared = [p["graph_tokens_equal"] for p in pairs if "graph_tokens_equal" in p]
    res["pairs_compared"] = len(compared)
    res["all_graph_tokens_equal"] = bool(compared) and all(compared)
    res["graph_modes"] = sorted({p["modes"]["graph"].get("cuda_graph", "error") for p in pairs if "modes" in p})
    return res


def _decode_stats(step_s: list[float], host_s: list[float], layers: int) -> dict[str, Any]:
    from hybrimoe_kt.runtime.harness import summary_us

    mean = sum(step_s) / len(step_s) if step_s else 0.0
    return {"tok_s": round(1.0 / mean, 3) if mean > 0 else 0.0, "step_mean_s": round(mean, 7),
            "step": summary_us(step_s), "host_us_per_layer": summary_us([h / layers for h in host_s])}


def _counter_snapshot(moe: Any) -> tuple[int, int, int, int]:
    c = moe.cache.counters
    return c.hits + c.late_hits, c.misses, moe.pool.bytes_copied, moe.stats.forwards


def graph_decode(moe: Any, replay: Any, decode: list[Any], seed: int, capture: bool) -> dict[str, Any]:
    """Decode ``decode`` one step at a time through the runtime's graph-safe layers: one step over all
    layers captured in a CUDA graph and replayed (``capture``), or the same function run uncaptured (the
    CPU stand-in). Inputs (random rows drawn as ``run_replay`` draws them for ``seed``) and routing are
    placed on the device beforehand and copied into static buffers before each step, untimed."""
    import torch

    if len(decode) < 2:
        raise ValueError(f"graph decode needs at least 2 decode steps (one untimed), got {len(decode)}")
    dev, layers = moe.tier.device, moe.store.n_layers
    hidden = moe.store.hidden
    gen = torch.Generator().manual_seed(seed)
    xs, ids_all, w_all = [], [], []
    for step in decode:
        xs.append((torch.randn(step.n_tokens, hidden, generator=gen) * 0.5).to(torch.bfloat16).to(dev))
        routes = [replay.routing(step, layer) for layer in range(layers)]
        ids_all.append(torch.stack([r[0] for r in routes]).to(dev))   # [L, 1, K] int64
        w_all.append(torch.stack([r[1] for r in routes]).to(dev))     # [L, 1, K] float32
    x_in = torch.zeros_like(xs[0])
    ids_in, w_in = torch.zeros_like(ids_all[0]), torch.zeros_like(w_all[0])

    def load(i: int) -> None:
        x_in.copy_(xs[i])
        ids_in.copy_(ids_all[i])
        w_in.copy_(w_all[i])

    def step_fn() -> torch.Tensor:
        x = x_in
        with moe.graph_step():
            for layer in range(layers):
                y = moe.forward(layer, x, ids_in[layer], w_in[layer])
                x = (x.float() + y.float()).to(torch.bfloat16)  # residual, as run_replay
        return x

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    out: dict[str, Any] = {}

    def run(graph: Any) -> None:
        if graph is None:
            step_fn()
            return
        graph.replay()
        moe.graph_replayed(1)  # a replay runs no Python: the next upkeep reads the step from the buffers

    with torch.no_grad():
        moe.enable_graph_decode(max_rows=1)
        h0, m0, b0, f0 = _counter_snapshot(moe)
        graph = None
        # step 0, untimed: its upkeep, the capture (after warm-up steps on a side stream, which change no
        # runtime state: the upkeep counts a step at the next begin_forward), then the step itself
        t0 = time.perf_counter()
        load(0)
        moe.begin_forward(is_prefill=False)
        if capture:
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(GRAPH_WARMUP_STEPS):
                    step_fn()
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    step_fn()
            except Exception as e:
                sync()
                return {"graph": f"capture failed: {type(e).__name__}: {e}",
                        "traceback": traceback.format_exc()[-2000:]}
        run(graph)
        sync()
        out["setup_s"] = round(time.perf_counter() - t0, 3)
        step_s, host_s, upkeep_s, launch_s = [], [], [], []
        for i in range(1, len(decode)):
            load(i)
            sync()
            ta = time.perf_counter()
            moe.begin_forward(is_prefill=False)  # the upkeep, outside the graph
            tb = time.perf_counter()
            run(graph)
            tc = time.perf_counter()
            sync()
            td = time.perf_counter()
            step_s.append(td - ta)
            host_s.append(tc - ta)
            upkeep_s.append(tb - ta)
            launch_s.append(tc - tb)
        moe.end_graph_steps()
        h1, m1, b1, f1 = _counter_snapshot(moe)
    from hybrimoe_kt.runtime.harness import summary_us

    acc = (h1 - h0) + (m1 - m0)
    out.update(_decode_stats(step_s, host_s, layers))
    out.update({"graph": "replayed" if graph is not None else GRAPH_STAND_IN,
                "upkeep_us": summary_us(upkeep_s),
                ("replay_call_us" if graph is not None else "step_call_us"): summary_us(launch_s),
                "decode_hit_rate": round((h1 - h0) / acc, 4) if acc else 0.0,
                "gb_copied": round((b1 - b0) / 1e9, 4), "steps": len(decode), "timed_steps": len(step_s),
                "steps_counted": (f1 - f0) // layers if layers else 0})
    del graph
    return out


def ab(device: str, cpu_backend: str, dry: bool, budget: Budget, layers: int, decode_steps: int,
       report: dict[str, Any], save: Callable[[], None]) -> dict[str, Any]:
    import numpy as np

    from hybrimoe_kt.core.cost import RooflineCost
    from hybrimoe_kt.core.hardware import load_profile
    from hybrimoe_kt.core.strategies import get_strategy, slots_for
    from hybrimoe_kt.kernels.cpu_backend import default_threads, make_cpu_backend
    from hybrimoe_kt.kernels.cpu_ktkernel import CpuWorkerPool
    from hybrimoe_kt.runtime.device import Tier
    from hybrimoe_kt.runtime.graph_decode import graph_unsupported
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
    why = graph_unsupported(tier, backends)
    res: dict[str, Any] = {"tier": tier.label, "label": f"{tier.label}; random bf16 weights; {replay.label}",
                           "shape": shape.describe(), "cpu_backend": backends[0].name,
                           "setup_s": round(time.perf_counter() - t0, 1), "graph_unsupported": why, "runs": []}
    report["ab"] = res
    prefill, decode = replay.steps("prefill"), replay.steps("decode")
    runs = [("stock", 0.0)] + [(s, r) for r in (0.25, 0.5) for s in ("static-frequency", "hybrimoe")]

    def runtime(strategy: str, ratio: float) -> Any:
        """A fresh runtime after the warm-up (allocator, kernels) and the prefill: (runtime, the prefill's
        record, bytes copied to the GPU tier before the prefill)."""
        spec = get_strategy(strategy)
        moe = HybridMoE(store, tier, spec, slots_for(spec, layers, shape.n_experts, ratio), cost,
                        shape.top_k, counts=counts, cpu_backends=backends)
        run_replay(moe, replay, decode[:2], seed=7, timed=False)
        b0 = moe.pool.bytes_copied
        pre = run_replay(moe, replay, prefill, seed=1)
        return moe, pre, b0

    # pass 1, graph off: the eager layer calls (every run first, so a failing capture cannot lose them)
    for strategy, ratio in runs:
        if budget.left() < 20:
            res["runs"].append({"strategy": strategy, "cache_ratio": ratio, "skipped": "time budget"})
            continue
        moe = None
        try:
            moe, pre, b0 = runtime(strategy, ratio)
            h0, m0, bd, _ = _counter_snapshot(moe)
            dec = run_replay(moe, replay, decode, seed=2)
            c = moe.cache.counters
            acc = (c.hits + c.late_hits - h0) + (c.misses - m0)
            host = [dec.forward_upkeep_s[i] + sum(dec.layer_host_s[i * layers:(i + 1) * layers])
                    for i in range(len(dec.forward_s))]
            row = {"strategy": strategy, "cache_ratio": ratio, "slots": moe.cache.capacity,
                   "prefill_ms_per_layer": round(1e3 * sum(pre.forward_s) / layers, 3),
                   "prefill_tokens": sum(pre.forward_tokens),
                   "decode_ms_per_layer": summary_us([f / layers for f in dec.forward_s]),
                   "decode_hit_rate": round((c.hits + c.late_hits - h0) / acc, 4) if acc else 0.0,
                   "gb_copied": round((moe.pool.bytes_copied - b0) / 1e9, 4),
                   "host_overhead_per_decode_layer": summary_us(dec.layer_host_s),
                   "gpu_experts": moe.stats.gpu_experts, "cpu_experts": moe.stats.cpu_experts,
                   "decode_eager": {"mode": "eager (layer by layer)",
                                    **_decode_stats(dec.forward_s, host, layers),
                                    "decode_hit_rate": round((c.hits + c.late_hits - h0) / acc, 4) if acc else 0.0,
                                    "gb_copied": round((moe.pool.bytes_copied - bd) / 1e9, 4),  # decode only
                                    # the steps the graph run times (its step 0 holds the capture)
                                    "mean_s_steps_1_on": round(float(np.mean(dec.forward_s[1:])), 7)
                                    if len(dec.forward_s) > 1 else None}}
        except Exception as e:
            row = {"strategy": strategy, "cache_ratio": ratio, **_error(e)}
        del moe
        _free_device(tier.is_cuda)
        res["runs"].append(row)
        print(f"  {strategy:17s} cache {ratio:.2f}: " + ", ".join(
            f"{k}={v}" for k, v in row.items() if k not in ("strategy", "cache_ratio", "traceback", "decode_eager",
                                                           "decode_ms_per_layer", "host_overhead_per_decode_layer"))
              + f", eager tok/s={row.get('decode_eager', {}).get('tok_s')}", flush=True)
        save()
    # pass 2, graph on: a fresh runtime per run, the same warm-up and prefill, then graph decode steps
    for row in res["runs"]:
        if "skipped" in row or "error" in row:
            continue
        if why is not None and not dry:
            row["graph"] = f"unsupported: {why}"
            continue
        if budget.left() < 20:
            row["graph"] = "skipped: time budget"
            continue
        moe = None
        try:
            moe, _, _ = runtime(row["strategy"], row["cache_ratio"])
            g = graph_decode(moe, replay, decode, seed=2, capture=why is None)
            row["graph"] = g.pop("graph")
            if "step_mean_s" in g:
                row["decode_graph"] = {"mode": row["graph"], **g}
                eager_s = row["decode_eager"]["mean_s_steps_1_on"]  # the same steps as the graph run's
                row["graph_speedup"] = (round(eager_s / g["step_mean_s"], 3)
                                        if eager_s and g["step_mean_s"] > 0 else None)
            else:
                row["graph_traceback"] = g.get("traceback")
        except Exception as e:
            err = _error(e)
            row["graph"] = f"error: {err['error']}"
            row["graph_traceback"] = err["traceback"]
        del moe
        _free_device(tier.is_cuda)
        print(f"  {row['strategy']:17s} cache {row['cache_ratio']:.2f}: graph {row['graph']}, "
              f"speedup {row.get('graph_speedup')}, "
              f"tok/s {row.get('decode_graph', {}).get('tok_s')} vs {row['decode_eager']['tok_s']}", flush=True)
        save()
    res["decode_tokens"] = len(decode)
    res["note"] = ("counts for placement come from a second synthetic trace (seed 1000), never the replayed one; "
                   "a run's gb_copied counts prefill and decode, decode_eager's and decode_graph's decode only; "
                   "decode_eager and decode_graph each run on a fresh runtime after the same warm-up and prefill; "
                   "tok_s = 1 / mean step time (synchronised around each step); host_us_per_layer: eager = "
                   "upkeep + decide + dispatch, graph = upkeep + the replay() call (unsynchronised), per layer")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU stand-in with tiny shapes (no GPU needed)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "results"))
    ap.add_argument("--budget-s", type=float, default=420.0, help="global time budget")
    ap.add_argument("--chat-budget-s", type=float, default=120.0,
                    help="no chat family starts after this many seconds of the chat section")
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "device_check.json"

    def save() -> None:
        report["wall_s"] = round(time.perf_counter() - budget.t0, 1)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
        tmp.replace(path)

    for name, fn in (("env", lambda: env_info(device, cpu_backend)),
                     ("numerics", lambda: numerics(device, cpu_backend, dry)),
                     ("chat", lambda: chat(device, dry, budget, args.chat_budget_s, report, save)),
                     ("ab", lambda: ab(device, cpu_backend, dry, budget, layers, steps, report, save))):
        section(report, name, budget, fn)
        save()
    print(f"wrote {path} ({report['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
