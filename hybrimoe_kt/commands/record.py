"""``hybrimoe-kt record``: run a local Hugging Face MoE model on prompts and save its routing trace."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("record", help="record a routing trace from a local HF MoE model")
    p.add_argument("--model-path", required=True, help="local Hugging Face model folder")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", required=True, help="output stem: writes STEM.npz and STEM.json")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model_dir = Path(args.model_path)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"--model-path {model_dir} is not a Hugging Face model folder (no config.json)")
    prompts_file = Path(args.prompts)
    if not prompts_file.is_file():
        raise ValueError(f"--prompts {prompts_file}: file not found")
    prompts = [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {prompts_file} has no non-empty line")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hybrimoe_kt.traces.format import save_trace
    from hybrimoe_kt.traces.recorder import record_trace

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot load the model in {model_dir}: {e}") from None
    trace = record_trace(model, prompts, args.max_new_tokens, tokenizer=tokenizer,
                         model_name=model_dir.name, source=f"hybrimoe-kt record --model-path {model_dir}")
    path = save_trace(trace, args.out)
    print(f"wrote {path}: {trace.n_tokens} tokens, {trace.n_layers} MoE layers, skipped {trace.n_skipped}")
    return 0
