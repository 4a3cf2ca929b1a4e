"""``hybrimoe-kt chat``: talk to a hybrid model (the flags mirror ``ktransformers.local_chat``).

With ``--prompt`` or ``--prompt-file`` it answers once; otherwise it reads one user turn per line from
stdin until EOF or ``exit``, keeping the conversation through the tokenizer's chat template. Tokens
are streamed to stdout; after each answer it prints prefill and decode speed, the GPU-tier hit rate,
the CPU/GPU expert split, the bytes copied to the GPU tier, and what the GPU tier was.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from hybrimoe_kt.commands.runtime_flags import (add_kt_cuda_graph, add_runtime_flags, resolve_cuda_graph,
                                                runtime_overrides)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a hybrid model (streams tokens, prints speed and cache stats)",
                       description=__doc__)
    p.add_argument("--model-path", "--model_path", dest="model_path", required=True,
                   help="local Hugging Face model folder")
    p.add_argument("--gguf-path", "--gguf_path", dest="gguf_path", default=None, help="GGUF file (or folder "
                   "with one) holding the routed experts, kept quantized for the CPU kernels; the rest comes "
                   "from --model-path, or from the GGUF too when --model-path holds only config and tokenizer")
    p.add_argument("--optimize-config-path", "--optimize_config_path", dest="optimize_config_path", required=True,
                   help="optimize rules YAML (optimize_rules/*.yaml)")
    p.add_argument("--prompt", default=None, help="answer this prompt once and exit")
    p.add_argument("--prompt-file", default=None, help="answer the text of this file once and exit")
    p.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=300,
                   help="tokens to generate per answer")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--cuda-graph", choices=("auto", "on", "off"), default="auto",
                   help="capture decode steps in a CUDA graph and replay them: auto (default) = on where "
                        "supported (model on CUDA, a decode-lookup strategy, kt-kernel, triton); on = "
                        "required (an error elsewhere); off = eager decode")
    add_kt_cuda_graph(p)
    p.add_argument("--force-think", "--force_think", dest="force_think", action="store_true",
                   help="start every answer with '<think>\\n' after the chat template (reasoning models)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="feed the raw text (no chat template, no conversation history)")
    add_runtime_flags(p)
    p.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    """User errors, before the (slow) model load."""
    model = Path(args.model_path)
    if not (model / "config.json").is_file():
        raise ValueError(f"--model-path {model} is not a model folder (no config.json)")
    if args.gguf_path is not None and not Path(args.gguf_path).exists():
        raise ValueError(f"--gguf-path {args.gguf_path} does not exist")
    if args.prompt is not None and args.prompt_file is not None:
        raise ValueError("give --prompt or --prompt-file, not both")
    if args.prompt_file is not None and not Path(args.prompt_file).is_file():
        raise ValueError(f"--prompt-file {args.prompt_file} does not exist")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError(f"--temperature must be >= 0 and --top-p in (0, 1], got {args.temperature}, "
                         f"{args.top_p}")
    if args.force_think and args.no_chat_template:
        raise ValueError("--force-think adds to the chat template's answer prefix: drop --no-chat-template")
    resolve_cuda_graph(args)


def stats_lines(result: Any, tier_label: str) -> list[str]:
    c = result.counters
    return [
        f"prefill: {result.prompt_tokens} tokens in {result.prefill_s:.3f} s, {result.prefill_tok_s:.2f} tok/s",
        f"decode: {result.new_tokens} tokens, {result.decode_tok_s:.2f} tok/s",
        f"GPU-tier hit rate: {c.hit_rate:.1%} ({c.hits + c.late_hits} of {c.hits + c.late_hits + c.misses}); "
        f"experts CPU/GPU: {c.cpu_experts}/{c.gpu_experts} ({c.gpu_share:.1%} on the GPU tier); "
        f"copied {c.gb_copied:.4f} GB",
        f"GPU tier: {tier_label}",
    ]


CUDA_GRAPH = {"auto": None, "on": True, "off": False}  # --cuda-graph -> generate(cuda_graph=...)


def answer(hm: Any, ids: list[int], args: argparse.Namespace) -> Any:
    from hybrimoe_kt.kt.generation import generate

    def emit(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = generate(hm, ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                      seed=args.seed, on_text=emit, cuda_graph=CUDA_GRAPH[args.cuda_graph])
    print()
    for line in stats_lines(result, hm.tier_label):
        print(line)
    return result


def read_turn(stream: Any) -> Optional[str]:
    """The next non-empty user line; None at EOF or 'exit'/'quit'."""
    while True:
        if stream.isatty():
            print("Chat: ", end="", flush=True)
        line = stream.readline()
        if not line:
            return None
        text = line.strip()
        if text in ("exit", "quit"):
            return None
        if text:
            return text


THINK = "<think>\n"


def prompt_ids(tokenizer: Any, history: list[dict[str, str]], text: str, args: argparse.Namespace) -> list[int]:
    """The turn's token ids: the chat template (unless --no-chat-template), then '<think>\\n' with
    --force-think, as kTransformers' local_chat does for reasoning models."""
    from hybrimoe_kt.kt.generation import encode_prompt

    ids = encode_prompt(tokenizer, history, text, not args.no_chat_template)
    if args.force_think:
        ids = list(ids) + list(tokenizer.encode(THINK, add_special_tokens=False))
    return ids


def run(args: argparse.Namespace) -> int:
    check_args(args)
    overrides = runtime_overrides(args, args.model_path)  # flag errors before the slow load
    from hybrimoe_kt.kt.rules import load_rules

    load_rules(args.optimize_config_path)  # a bad rule file is a user error: fail before loading
    from transformers.utils import logging as hf_logging

    from hybrimoe_kt.kt.loader import load_hybrid

    hf_logging.disable_progress_bar()
    hm = load_hybrid(args.model_path, args.optimize_config_path, overrides=overrides, gguf_path=args.gguf_path)
    use_template = not args.no_chat_template
    if args.prompt is not None or args.prompt_file is not None:
        text = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text(encoding="utf-8")
        answer(hm, prompt_ids(hm.tokenizer, [], text, args), args)
        return 0
    history: list[dict[str, str]] = []
    while (text := read_turn(sys.stdin)) is not None:
        result = answer(hm, prompt_ids(hm.tokenizer, history, text, args), args)
        if use_template:
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": result.text}]
    return 0
