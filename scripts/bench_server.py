"""Serving throughput and latency at 1, 8 and 32 concurrent clients, one request at a time against
continuous batching, side by side in one run; written to results/bench_server.json.

Each configuration is a real ``hybrimoe-kt serve`` process on loopback over a tiny random-weight model
(hybrimoe rules; the GPU tier is the CPU stand-in, so the figures say what batching does to the host
path and the CPU kernels here, not a GPU's speed). Per concurrency level, every client sends its
requests back to back (``--requests`` in all per level, ``--max-tokens`` greedy tokens each, EOS
ignored). ``--max-batch 1`` is the one-at-a-time schedule (what the server did before continuous
batching); ``--max-batch 32`` lets every client of the largest level share a forward. Levels run in
alternating order of the servers, ``--rounds`` times; medians are reported. ``--baseline-src DIR`` adds
the server of another checkout (e.g. ``git worktree add /tmp/old 63173aa``, the last commit before
continuous batching) run under the same load, with that checkout's commit recorded.

    python scripts/bench_server.py [--quick] [--families mixtral,deepseek-v2] [--baseline-src DIR]
                                   [--out results/bench_server.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from hybrimoe_kt.measure.provenance import provenance

REPO = Path(__file__).resolve().parents[1]
RULES = {"mixtral": "Mixtral-hybrimoe.yaml", "deepseek-v2": "DeepSeek-V2-hybrimoe.yaml",
         "qwen3-moe": "Qwen3-MoE-hybrimoe.yaml"}
LEVELS = (1, 8, 32)
BATCHES = (1, 32)


def start_server(model_dir: Path, rules: Path, max_batch: int | None,
                 src: str | None = None) -> tuple[subprocess.Popen, int]:
    """A serve process; ``max_batch`` None for a baseline checkout ``src`` (its own flags and defaults)."""
    cmd = [sys.executable, "-m", "hybrimoe_kt.cli", "serve", "--model-path", str(model_dir), "--optimize-config-path",
           str(rules), "--port", "0", "--queue-size", "256", "--model-name", "bench"]
    if max_batch is not None:
        cmd += ["--max-batch", str(max_batch)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if src is not None:
        env["PYTHONPATH"] = src
    # run from the checkout being measured: ``python -m`` imports from the working directory first
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                            cwd=src if src is not None else REPO)
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.search(r"on http://[\d.]+:(\d+)/v1", line)
        if m:
            return proc, int(m.group(1))
    raise RuntimeError(f"server did not start: {' '.join(cmd)}")


def post(port: int, body: dict[str, Any]) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {data}")
    return data


def level(port: int, clients: int, requests: int, max_tokens: int) -> dict[str, Any]:
    """``clients`` threads share ``requests`` requests, each client's back to back."""
    per = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(per[i]):
            t0 = time.perf_counter()
            r = post(port, {"prompt": f"client {i} request {j} says", "max_tokens": max_tokens, "ignore_eos": True})
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                tokens[0] += r["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"clients": clients, "requests": len(latencies), "tokens": tokens[0], "wall_s": round(wall, 4),
            "tok_s": round(tokens[0] / wall, 2), "p50_s": round(latencies[len(latencies) // 2], 4),
            "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 4)}


def src_commit(src: str) -> str:
    r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="mixtral,deepseek-v2")
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1, help="tiny model weights")
    ap.add_argument("--quick", action="store_true", help="1 family, 32 requests, 1 round")
    ap.add_argument("--baseline-src", default=None, help="another checkout whose server runs under the same load")
    ap.add_argument("--out", default=str(REPO / "results" / "bench_server.json"))
    args = ap.parse_args()
    families = args.families.split(",")[:1] if args.quick else args.families.split(",")
    requests, rounds = (32, 1) if args.quick else (args.requests, args.rounds)
    from hybrimoe_kt.kt.tiny import make_tiny_model

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for fam in families:
            model_dir = Path(make_tiny_model(fam, Path(tmp) / fam, seed=args.seed)["dir"])
            rules = REPO / "optimize_rules" / RULES[fam]
            servers: dict[Any, tuple[subprocess.Popen, int]] = {b: start_server(model_dir, rules, b) for b in BATCHES}
            if args.baseline_src:
                servers["baseline"] = start_server(model_dir, rules, None, args.baseline_src)
            names = list(servers)
            runs: dict[tuple[int, int], list[dict[str, Any]]] = {}
            try:
                for _ in range(rounds):
                    for clients in LEVELS:
                        order = names if _ % 2 == 0 else list(reversed(names))
                        for b in order:
                            post(servers[b][1], {"prompt": "warm up", "max_tokens": 2})
                            runs.setdefault((b, clients), []).append(level(servers[b][1], clients, requests,
                                                                           args.max_tokens))
            finally:
                for proc, _port in servers.values():
                    proc.terminate()
                    proc.wait(60)
            for clients in LEVELS:
                row: dict[str, Any] = {"family": fam, "clients": clients}
                for b in names:
                    rs = runs[(b, clients)]
                    key = f"max_batch_{b}" if b != "baseline" else "baseline"
                    row[key] = {k: statistics.median(r[k] for r in rs) for k in ("tok_s", "p50_s", "p99_s")}
                row["tok_s_ratio"] = round(row[f"max_batch_{BATCHES[-1]}"]["tok_s"] / row["max_batch_1"]["tok_s"], 3)
                if "baseline" in row:
                    row["tok_s_ratio_vs_baseline"] = round(row[f"max_batch_{BATCHES[-1]}"]["tok_s"] /
                                                           row["baseline"]["tok_s"], 3)
                results.append(row)
                print(f"{fam:12s} {clients:3d} clients  one-at-a-time {row['max_batch_1']['tok_s']:8.1f} tok/s "
                      f"p50 {row['max_batch_1']['p50_s']:.3f}s p99 {row['max_batch_1']['p99_s']:.3f}s | batched "
                      f"{row['max_batch_32']['tok_s']:8.1f} tok/s p50 {row['max_batch_32']['p50_s']:.3f}s "
                      f"p99 {row['max_batch_32']['p99_s']:.3f}s | x{row['tok_s_ratio']}"
                      + (f" | baseline {row['baseline']['tok_s']:8.1f} tok/s p50 {row['baseline']['p50_s']:.3f}s "
                         f"p99 {row['baseline']['p99_s']:.3f}s" if "baseline" in row else ""), flush=True)
    out = provenance(benchmark="bench_server", gpu_tier="CPU stand-in (device cpu): not GPU figures",
                     profile="tiny random-weight models, hybrimoe rules", seed=args.seed, requests_per_level=requests,
                     max_tokens=args.max_tokens, rounds=rounds, batches=list(BATCHES), results=results,
                     baseline=None if not args.baseline_src else {"src": args.baseline_src,
                                                                   "commit": src_commit(args.baseline_src)})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
