"""``hybrimoe-kt serve``: an OpenAI-compatible HTTP server (chat and text completions, streaming or not)
over a model loaded with an optimize-rules file; requests run one at a time on one worker."""

from __future__ import annotations

import argparse
import signal
import socket
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
    p.add_argument("--queue-size", default="16", help="requests that may wait; more get HTTP 429 (default 16)")
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
    _check_bind(args.host, port)  # fail before the slow model load

    from hybrimoe_kt.kt.loader import load_hybrid
    from hybrimoe_kt.server.app import Server
    from hybrimoe_kt.server.engine import Engine

    hybrid = load_hybrid(model_dir, rules, gguf_path=args.gguf_path, overrides=overrides)
    engine = Engine(hybrid, queue_size=queue_size)
    try:
        server = Server(engine, name, host=args.host, port=port, max_tokens_limit=limit)
    except OSError as e:
        raise ValueError(f"cannot listen on {args.host}:{port}: {e.strerror or e}") from None
    print(f"serving {name!r} ({hybrid.tier_label}) on http://{server.host}:{server.port}/v1 "
          f"(queue {queue_size}, max_tokens <= {limit}); Ctrl-C stops", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # stop like Ctrl-C: finish the engine, close the socket
    server.serve_forever()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _check_bind(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} does not resolve: {e}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
