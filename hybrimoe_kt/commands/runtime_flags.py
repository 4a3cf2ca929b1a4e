"""Flags shared by ``chat``, ``serve`` and ``ab``: the runtime settings that override the rule file's
kwargs (strategy, GPU expert budget, prefetch depth, cost model, placement counts, CPU threads), and
the spellings kTransformers' ``local_chat`` / server and the HybriMoE release use for the same things.

kTransformers spells flags with underscores (``--model_path``, ``--gguf_path``,
``--optimize_config_path``, ``--max_new_tokens``, ``--cpu_infer``, ``--use_cuda_graph``,
``--force_think``); each command accepts them beside its own. The HybriMoE release's ``--cache_size N``
(experts cached per MoE layer) becomes a cache ratio of N over the model's routed experts; its
``--prefetch_size 0`` (what its README runs) is accepted, and a non-zero size, which counts prefetched
experts where this project budgets prefetches by copy time, is refused with what to use instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

# the routed-expert count of a model's config.json, by family
EXPERT_KEYS = ("n_routed_experts", "num_local_experts", "num_experts")


def parse_bool(text: str) -> bool:
    """kTransformers' boolean flags: True/False (any case), 1/0, yes/no."""
    t = text.strip().lower()
    if t in ("true", "1", "yes"):
        return True
    if t in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def add_kt_cuda_graph(p: argparse.ArgumentParser) -> None:
    """``--use_cuda_graph True|False`` beside ``--cuda-graph``: True = on where supported, False = off."""
    p.add_argument("--use_cuda_graph", type=parse_bool, default=None, metavar="BOOL",
                   help="kTransformers' spelling: True = --cuda-graph auto, False = --cuda-graph off")


def resolve_cuda_graph(args: argparse.Namespace) -> None:
    """Fold ``--use_cuda_graph`` into ``args.cuda_graph``; both given and disagreeing is an error."""
    kt = getattr(args, "use_cuda_graph", None)
    if kt is None:
        return
    if args.cuda_graph == ("off" if kt else "on"):
        raise ValueError(f"--use_cuda_graph {kt} contradicts --cuda-graph {args.cuda_graph}")
    if not kt:
        args.cuda_graph = "off"


def add_runtime_flags(p: argparse.ArgumentParser, cpu_infer: bool = True) -> None:
    g = p.add_argument_group("runtime settings (override the rule file's kwargs for every MoE layer)")
    g.add_argument("--strategy", default=None, help="strategy name (stock, static-frequency, lru-offload, "
                   "hybrimoe-paper, hybrimoe-layer, hybrimoe)")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--cache-ratio", type=float, default=None, metavar="R",
                        help="GPU expert cache as a share of the routed experts, 0..1")
    budget.add_argument("--gpu-slots", type=int, default=None, metavar="N", help="GPU expert slots in all")
    budget.add_argument("--gpu-gib", type=float, default=None, metavar="G", help="GiB of GPU expert slots")
    budget.add_argument("--cache_size", type=int, default=None, metavar="N",
                        help="the HybriMoE release's spelling: N experts cached per MoE layer")
    g.add_argument("--prefetch-depth", type=int, default=None, metavar="D", help="prefetch this many layers ahead")
    g.add_argument("--prefetch_size", type=int, default=None, metavar="N",
                   help="the HybriMoE release's spelling: only 0 (no prefetch) maps; hybrimoe does not prefetch")
    g.add_argument("--hardware-profile", default=None, metavar="P",
                   help="cost model of the decisions: a preset name or a calibrated profile JSON")
    g.add_argument("--placement-counts", default=None, metavar="F",
                   help="routing trace or .npy [L, E] of activation counts for the initial placement")
    if cpu_infer:
        g.add_argument("--cpu-infer", "--cpu_infer", dest="cpu_infer", type=int, default=None, metavar="T",
                       help="CPU expert threads (overrides the rule file's cpu_threads)")


def model_experts(model_dir: str | Path) -> int:
    """Routed experts per MoE layer from the model folder's config.json."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    for key in EXPERT_KEYS:
        n = config.get(key) or (config.get("text_config") or {}).get(key)
        if isinstance(n, int) and n > 0:
            return n
    raise ValueError(f"{path} names no routed-expert count ({', '.join(EXPERT_KEYS)}): --cache_size needs it")


def runtime_overrides(args: argparse.Namespace, model_dir: str | Path) -> Optional[dict[str, Any]]:
    """The overrides the flags ask for (None when none), checked; a budget flag clears the rule's other
    budget kwargs so that the one given decides."""
    out: dict[str, Any] = {}
    if args.strategy is not None:
        from hybrimoe_kt.core.strategies import get_strategy

        spec = get_strategy(args.strategy)
        if spec.clairvoyant:
            raise ValueError(f"--strategy {args.strategy} needs the future and exists only in the simulator")
        out["strategy"] = spec.name
    budget: Optional[tuple[str, Any]] = None
    if args.cache_ratio is not None:
        if not 0.0 <= args.cache_ratio <= 1.0:
            raise ValueError(f"--cache-ratio must be in [0, 1], got {args.cache_ratio}")
        budget = ("cache_ratio", float(args.cache_ratio))
    elif args.gpu_slots is not None:
        if args.gpu_slots < 0:
            raise ValueError(f"--gpu-slots must be >= 0, got {args.gpu_slots}")
        budget = ("gpu_slots", int(args.gpu_slots))
    elif args.gpu_gib is not None:
        if not args.gpu_gib >= 0.0:
            raise ValueError(f"--gpu-gib must be >= 0, got {args.gpu_gib}")
        budget = ("gpu_gib", float(args.gpu_gib))
    elif args.cache_size is not None:
        n = model_experts(model_dir)
        if not 0 <= args.cache_size <= n:
            raise ValueError(f"--cache_size must be in [0, {n}] (the model's routed experts per layer), got "
                             f"{args.cache_size}")
        budget = ("cache_ratio", args.cache_size / n)
    if budget is not None:
        out.update({"cache_ratio": None, "gpu_slots": None, "gpu_gib": None})
        out[budget[0]] = budget[1]
    if args.prefetch_size not in (None, 0):
        raise ValueError(f"--prefetch_size {args.prefetch_size} does not map: prefetches here are budgeted by "
                         f"copy time, not counted; use --prefetch-depth D with a prefetching strategy "
                         f"(hybrimoe-paper, hybrimoe-layer), or --prefetch_size 0")
    if args.prefetch_depth is not None:
        if args.prefetch_depth < 1:
            raise ValueError(f"--prefetch-depth must be >= 1, got {args.prefetch_depth}")
        out["prefetch_depth"] = int(args.prefetch_depth)
    if args.hardware_profile is not None:
        from hybrimoe_kt.core.hardware import load_profile

        load_profile(args.hardware_profile)  # a bad name or file fails before the model load
        out["hardware_profile"] = args.hardware_profile
    if args.placement_counts is not None:
        if not Path(args.placement_counts).exists():
            raise ValueError(f"--placement-counts {args.placement_counts} does not exist")
        out["placement_counts"] = args.placement_counts
    cpu = getattr(args, "cpu_infer", None)
    if cpu is not None:
        if cpu < 1:
            raise ValueError(f"--cpu-infer must be >= 1 thread, got {cpu}")
        out["cpu_threads"] = int(cpu)
    return out or None
