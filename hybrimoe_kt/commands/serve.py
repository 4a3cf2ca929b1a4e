"""``hybrimoe-kt serve``: an OpenAI-compatible HTTP server (chat and text completions, streaming or not)
over a model loaded with an optimize-rules file; one worker runs the requests with continuous batching
(``server.engine``), uvicorn serves HTTP (``server.listener``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from hybrimoe_kt.commands.runtime_flags import add_runtime_flags, runtime_overrides


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible server (/v1/chat/completions, /v1/completions)")
    p.add_argument("--model-path", "--model_path", dest="model_path", required=True,
                   help="local Hugging Face model folder")
    p.add_argument("--optimize-config-path", "--optimize_config_path", dest="optimize_config_path", required=True,
                   help="optimize-rules YAML file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    # numbers are checked in run() so that a bad value gives one error line
    p.add_argument("--port", default="10002", help="TCP port, 0 for any free one (default 10002)")
    p.add_argument("--max-tokens-limit", default="512", help="largest max_tokens a request may ask (default 512)")
    p.add_argument("--queue-size", default="64", help="requests that may wait for a place in the batch; more get "
                   "HTTP 429 with Retry-After (default 64)")
    p.add_argument("--max-batch", default="8", help="requests decoded together in one forward (default 8; 1 "
                   "serves one request at a time)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (default: none)")
    p.add_argument("--grace-period", default="30", help="seconds SIGTERM/SIGINT gives running requests to "
                   "finish before they are ended (default 30)")
    p.add_argument("--idle-timeout", default="15", help="seconds a connection may stay idle or take to send "
                   "its request headers (default 15)")
    p.add_argument("--max-in-flight", default="256", help="HTTP requests handled at once; more get 503 "
                   "(default 256)")
    p.add_argument("--model-name", default=None, help="model id clients send (default: the folder name)")
    p.add_argument("--gguf-path", "--gguf_path", dest="gguf_path", default=None, help="GGUF file (or folder "
                   "with one) holding the routed experts, kept quantized for the CPU kernels (every weight when "
                   "--model-path holds only config and tokenizer)")
    add_runtime_flags(p)
    p.set_defaults(func=run)


def _int(flag: str, value: str, lo: int, hi: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{flag} {value!r} is not an integer") from None
    if not lo <= n <= hi:
        raise ValueError(f"{flag} {n} is out of range [{lo}, {hi}]")
    return n


def run(args: argparse.Namespace) -> int:
    port = _int("--port", args.port, 0, 65535)
    limit = _int("--max-tokens-limit", args.max_tokens_limit, 1, 1 << 20)
    queue_size = _int("--queue-size", args.queue_size, 1, 1 << 16)
    max_batch = _int("--max-batch", args.max_batch, 1, 1024)
    grace = _int("--grace-period", args.grace_period, 0, 3600)
    idle = _int("--idle-timeout", args.idle_timeout, 1, 3600)
    in_flight = _int("--max-in-flight", args.max_in_flight, 1, 1 << 16)
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key must not be empty")
    model_dir = Path(args.model_path)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"--model-path {args.model_path} is not a model directory (no config.json)")
    rules = Path(args.optimize_config_path)
    if not rules.is_file():
        raise ValueError(f"--optimize-config-path {args.optimize_config_path} is not a file")
    if args.gguf_path is not None and not Path(args.gguf_path).exists():
        raise ValueError(f"--gguf-path {args.gguf_path} does not exist")
    name = args.model_name or model_dir.resolve().name
    if not name:
        raise ValueError("--model-name must not be empty")
    overrides = runtime_overrides(args, model_dir)

    from hybrimoe_kt.server.listener import Server, bind

    sock = bind(args.host, port)  # fail before the slow model load

    from hybrimoe_kt.kt.loader import load_hybrid
    from hybrimoe_kt.server.engine import Engine

    hybrid = load_hybrid(model_dir, rules, gguf_path=args.gguf_path, overrides=overrides)
    engine = Engine(hybrid, queue_size=queue_size, max_batch=max_batch)
    server = Server(engine, name, max_tokens_limit=limit, api_key=args.api_key, grace_s=grace,
                    idle_timeout_s=idle, max_in_flight=in_flight, sock=sock)
    print(f"serving {name!r} ({hybrid.tier_label}) on http://{server.host}:{server.port}/v1 "
          f"(batch {max_batch}, queue {queue_size}, max_tokens <= {limit}); Ctrl-C or SIGTERM stops", flush=True)
    server.serve_forever()
    print("server stopped", flush=True)
    return 0
