"""Fixtures for the server tests: a tiny Mixtral under the stock and the hybrimoe rules, servers on
127.0.0.1 (ephemeral ports) in this process, and plain-HTTP helpers with timeouts."""

from __future__ import annotations

import http.client
import json
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest
import torch

from hybrimoe_kt.kt.loader import load_hybrid
from hybrimoe_kt.kt.tiny import make_tiny_model
from hybrimoe_kt.server.engine import Engine
from hybrimoe_kt.server.listener import Server

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "optimize_rules" / "Mixtral-hybrimoe.yaml"
STOCK_RULES = REPO / "optimize_rules" / "Mixtral-stock.yaml"
NAME = "tiny-mixtral"
LIMIT = 64
CHAT, COMP = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "x"}]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(make_tiny_model("mixtral", tmp_path_factory.mktemp("serve") / "m", seed=1)["dir"])


@pytest.fixture(scope="session")
def hybrid(model_dir: Path) -> Any:
    return load_hybrid(model_dir, RULES, progress=False)


@pytest.fixture(scope="session")
def stock(model_dir: Path) -> Any:
    return load_hybrid(model_dir, STOCK_RULES, progress=False)


ServerFactory = Callable[..., Server]


@pytest.fixture
def make_server() -> Iterator[ServerFactory]:
    """``make_server(model, max_batch=8, queue_size=64, **server_kwargs)``: started; shut down after."""
    started: list[Server] = []

    def make(model: Any, max_batch: int = 8, queue_size: int = 64, **kw: Any) -> Server:
        kw.setdefault("max_tokens_limit", LIMIT)
        srv = Server(Engine(model, queue_size=queue_size, max_batch=max_batch), NAME, host="127.0.0.1", port=0, **kw)
        srv.start_background()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.engine.resume()
        srv.shutdown()


@pytest.fixture(scope="module")
def server(stock: Any) -> Iterator[Server]:
    """Stock rules, batching on."""
    srv = Server(Engine(stock, queue_size=64, max_batch=8), NAME, host="127.0.0.1", port=0, max_tokens_limit=LIMIT)
    srv.start_background()
    yield srv
    srv.shutdown()


def call(srv: Server, method: str, path: str, body: Any = None, raw: Optional[bytes] = None, timeout: float = 120,
         headers: Optional[dict[str, str]] = None) -> tuple[int, Any]:
    status, _, parsed = call_full(srv, method, path, body, raw, timeout, headers)
    return status, parsed


def call_full(srv: Server, method: str, path: str, body: Any = None, raw: Optional[bytes] = None,
              timeout: float = 120, headers: Optional[dict[str, str]] = None) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=timeout)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers=headers or {"Content-Type": "application/json"})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    ctype = resp.getheader("Content-Type", "")
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, (json.loads(text) if ctype.startswith(
        "application/json") else text)


def concurrent(srv: Server, bodies: list[dict[str, Any]], path: str = COMP) -> list[tuple[int, Any]]:
    """POST every body at once; the responses in order."""
    results: dict[int, Any] = {}

    def worker(i: int) -> None:
        results[i] = call(srv, "POST", path, bodies[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == list(range(len(bodies)))
    return [results[i] for i in range(len(bodies))]


def sse_events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.split("\n\n") if line]


def logit_deficits(ref: Any, prompt: list[int], tokens: list[int]) -> list[float]:
    """Per generated token: how far its logit is below the best one, teacher-forced through ``ref``."""
    with torch.no_grad():
        logits = ref.model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()  # [n, V]
    return (logits.max(-1).values - logits[torch.arange(len(tokens)), torch.tensor(tokens)]).tolist()


def greedy_tokens(ref: Any, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = ref.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(prompt):].tolist()
