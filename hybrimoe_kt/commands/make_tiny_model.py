"""``hybrimoe-kt make-tiny-model``: write a tiny random-weight MoE model of one family (safetensors,
config, tokenizer; optionally a GGUF file) that loads offline with transformers."""

from __future__ import annotations

import argparse
import time


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from hybrimoe_kt.kt.families import FAMILIES
    from hybrimoe_kt.kt.gguf_io import EXPERT_TYPES

    p = subparsers.add_parser("make-tiny-model", help="write a tiny random-weight MoE model (no download)")
    p.add_argument("--family", required=True, help=f"model family: {', '.join(FAMILIES)}")
    p.add_argument("--out", required=True, help="output folder (must be empty or absent)")
    p.add_argument("--gguf", action="store_true", help="also write OUT/model.gguf")
    p.add_argument("--gguf-experts", default="q8_0", metavar="TYPE",
                   help=f"routed expert type in the GGUF file: {', '.join(EXPERT_TYPES)} (default q8_0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hybrimoe_kt.kt.families import get_family
    from hybrimoe_kt.kt.gguf_io import EXPERT_TYPES

    from hybrimoe_kt.kt.tiny import check_out_dir

    # user errors first, before any work: one line naming the known values
    get_family(args.family)
    if args.gguf_experts not in EXPERT_TYPES:
        raise ValueError(f"--gguf-experts {args.gguf_experts!r} is not one of {', '.join(EXPERT_TYPES)}")
    check_out_dir(args.out, args.force)
    from transformers.utils import logging as hf_logging

    from hybrimoe_kt.kt.tiny import load_model, make_tiny_model

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    print(f"[1/3] building a random {args.family} model (seed {args.seed}) and tokenizer", flush=True)
    info = make_tiny_model(args.family, args.out, seed=args.seed, force=args.force)
    print(f"      wrote {info['dir']}: {info['params']:,} parameters", flush=True)
    if args.gguf:
        print(f"[2/3] writing the GGUF file (routed experts {args.gguf_experts}, other tensors f32)",
              flush=True)
        from hybrimoe_kt.kt.gguf_io import write_gguf

        model, _ = load_model(args.out)
        path = write_gguf(model, f"{args.out}/model.gguf", expert_type=args.gguf_experts)
        print(f"      wrote {path}", flush=True)
    else:
        print("[2/3] GGUF skipped (pass --gguf to write one)", flush=True)
    print(f"[3/3] checking that it loads offline and generates", flush=True)
    tokens, elapsed = _smoke_generate(args.out)
    print(f"      generated {tokens} tokens in {elapsed * 1000:.0f} ms; done in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    return 0


def _smoke_generate(path: str) -> tuple[int, float]:
    import torch

    from hybrimoe_kt.kt.tiny import load_model

    model, tokenizer = load_model(path)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    return out.shape[1] - inputs["input_ids"].shape[1], time.perf_counter() - t
