"""A/B of two rule files on one model: the same prompts, greedy, measured side by side.

``run_side`` loads the model with one rule file, generates for every prompt and sums the measurements;
``agreement`` compares the greedy tokens of two sides; ``ratios`` divides B by A; ``projection`` replays
both sides' strategies through the simulator on a hardware profile (for machines without a GPU, where
the GPU tier is the CPU stand-in and measured speed says nothing about a real GPU).
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from hybrimoe_kt.kt.generation import GenerationResult, RuntimeCounters

log = logging.getLogger(__name__)

RATIO_KEYS = ("prefill_tok_s", "decode_tok_s", "hit_rate", "gpu_share", "gb_copied", "cpu_experts",
              "gpu_experts")
SIM_KEYS = ("decode_tok_s", "prefill_tok_s", "hit_rate", "slots")


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--prompts {p} does not exist")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {p} has no non-empty line")
    return prompts


def aggregate(results: Sequence[GenerationResult]) -> dict[str, Any]:
    """Totals over prompts: speeds are total tokens over total time."""
    prefill_s = sum(r.prefill_s for r in results)
    decode_s = sum(r.decode_s for r in results)
    prompt_tokens = sum(r.prompt_tokens for r in results)
    decode_forwards = sum(r.decode_forwards for r in results)
    counters = RuntimeCounters()
    for r in results:
        counters = counters + r.counters
    return {"prompt_tokens": prompt_tokens, "new_tokens": sum(r.new_tokens for r in results),
            "prefill_s": round(prefill_s, 6), "decode_s": round(decode_s, 6),
            "prefill_tok_s": round(prompt_tokens / prefill_s, 3) if prefill_s > 0 else 0.0,
            "decode_tok_s": round(decode_forwards / decode_s, 3) if decode_s > 0 else 0.0,
            **counters.summary()}


def run_side(model_dir: str | Path, rules_path: str | Path, prompts: Sequence[str], max_new_tokens: int,
             overrides: Optional[Mapping[str, Any]] = None, warmup_tokens: int = 2,
             cuda_graph: Optional[bool] = None) -> dict[str, Any]:
    """Load, warm up (``warmup_tokens`` on the first prompt, not measured), generate greedily for every
    prompt (EOS ignored, so both sides generate the same number of tokens), free the model."""
    from tqdm import tqdm

    from hybrimoe_kt.kt.generation import generate
    from hybrimoe_kt.kt.loader import load_hybrid
    from hybrimoe_kt.kt.rule_strategy import rule_strategy
    from hybrimoe_kt.kt.rules import load_rules

    rs = rule_strategy(load_rules(rules_path))
    hm = load_hybrid(model_dir, rules_path, overrides=overrides)
    try:
        rt = hm.runtime
        encoded = [list(hm.tokenizer(p).input_ids) for p in prompts]
        if warmup_tokens > 0:
            generate(hm, encoded[0], warmup_tokens, stop_on_eos=False, cuda_graph=cuda_graph)
        results = [generate(hm, ids, max_new_tokens, stop_on_eos=False, cuda_graph=cuda_graph)
                   for ids in tqdm(encoded, desc=Path(rules_path).stem, unit="prompt", leave=False)]
        capacity = int(rt.cache.capacity) if rt is not None else 0
        n_routed = rt.store.n_layers * rt.store.n_experts if rt is not None else 0
        side = {"rules": str(rules_path), "strategy": rs.strategy, "operator": rs.operator,
                "cache_ratio": rs.cache_ratio if rs.cache_ratio is not None else
                (capacity / n_routed if n_routed else 0.0),
                "gpu_slots": capacity, "gpu_tier": hm.tier_label,
                "gpu_tier_is_gpu": bool(rt is not None and rt.tier.is_cuda),
                "cpu_threads": (overrides or {}).get("cpu_threads"), "load_s": round(hm.load_s, 3),
                "warmup_tokens": warmup_tokens, **aggregate(results),
                "per_prompt": [r.summary() for r in results], "tokens": [r.tokens for r in results]}
    finally:
        del hm
        gc.collect()
    return side


def agreement(tokens_a: Sequence[Sequence[int]], tokens_b: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Fraction of generated positions where A and B chose the same token, per prompt and overall, and
    the first position where they differ (None when identical)."""
    per = []
    matched_all = total_all = 0
    for i, (a, b) in enumerate(zip(tokens_a, tokens_b)):
        n = max(len(a), len(b))
        matched = sum(1 for x, y in zip(a, b) if x == y)
        first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first is None and len(a) != len(b):
            first = min(len(a), len(b))
        per.append({"prompt": i, "matched": matched, "compared": n,
                    "fraction": round(matched / n, 6) if n else 1.0, "first_divergence": first})
        matched_all += matched
        total_all += n
    return {"overall": round(matched_all / total_all, 6) if total_all else 1.0, "matched": matched_all,
            "compared": total_all, "identical_prompts": sum(p["first_divergence"] is None for p in per),
            "per_prompt": per}


def ratios(a: Mapping[str, Any], b: Mapping[str, Any], keys: Sequence[str] = RATIO_KEYS) -> dict[str, Any]:
    """B / A for each key; None where A is 0."""
    return {k: (round(float(b[k]) / float(a[k]), 6) if a.get(k) else None) for k in keys}


def projection(strategy_a: str, ratio_a: float, strategy_b: str, ratio_b: float, hardware: str,
               trace_spec: str, seed: int = 0) -> dict[str, Any]:
    """SIMULATED decode/prefill speed and hit rate of both sides' strategies on ``hardware``."""
    from hybrimoe_kt.core.hardware import load_profile
    from hybrimoe_kt.core.strategies import get_strategy
    from hybrimoe_kt.sim.defaults import infer_model
    from hybrimoe_kt.sim.runner import SimSetup, simulate, spec_budget
    from hybrimoe_kt.traces.spec import parse_trace_spec

    profile = load_profile(hardware)
    trace = parse_trace_spec(trace_spec, seed=seed)
    model = infer_model(trace.model, trace.n_layers, trace.n_experts, trace.top_k)
    name = trace_spec if trace_spec.startswith("synthetic:") else \
        Path(trace_spec).name.removesuffix(".npz").removesuffix(".json")
    setup = SimSetup(trace, name, model, profile)
    sides, notes = {}, []
    for side, strategy, ratio in (("a", strategy_a, ratio_a), ("b", strategy_b, ratio_b)):
        budget = spec_budget(setup, get_strategy(strategy))
        if get_strategy(strategy).uses_gpu_cache and not budget.fits(ratio):
            fit = budget.max_ratio()
            notes.append(f"{side}: the rules' cache ratio {ratio:g} does not fit {model.name} on {profile.name} "
                         f"({profile.gpu_mem_gib:g} GiB); projected at the largest that fits, {fit:g}")
            ratio = fit
        rec = simulate(setup, [strategy], [ratio], progress=False)[0]
        sides[side] = {"strategy": strategy, "cache_ratio": ratio, **{k: rec[k] for k in SIM_KEYS}}
    return {"label": "SIMULATED", "note": f"cost model of hardware profile {profile.name}, not a measurement",
            "memory_notes": notes,
            "trace": name, "trace_tokens": trace.n_tokens, "model": model.name, "hardware": profile.name,
            "time_scale": round(setup.time_scale, 9), **sides,
            "ratio": ratios(sides["a"], sides["b"], ("decode_tok_s", "prefill_tok_s", "hit_rate"))}
