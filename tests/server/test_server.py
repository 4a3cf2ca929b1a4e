"""The OpenAI-compatible server over real HTTP on 127.0.0.1 (ephemeral ports), on a tiny Mixtral: endpoints,
greedy output vs ``model.generate``, streaming, request validation, concurrency without mixed state,
queue-full 429, client disconnects, CLI flags.

Tests that compare texts run under the stock rules, where every routed expert runs on the CPU kernel and
a request's output does not depend on what ran before it: those comparisons are exact. Under the hybrimoe
rules (GPU tier = CPU stand-in) the expert cache state decides which tier computes each expert, the tiers
round differently, and a near-tie in a router or in the logits of this random model can go either way:
there outputs are checked against teacher-forced reference logits within a tolerance."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
import torch

from hybrimoe_kt.kt.loader import load_hybrid
from hybrimoe_kt.kt.tiny import make_tiny_model
from hybrimoe_kt.server.app import Server
from hybrimoe_kt.server.engine import Engine
from hybrimoe_kt.server.generate import Sampler, token_loop

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "optimize_rules" / "Mixtral-hybrimoe.yaml"
STOCK_RULES = REPO / "optimize_rules" / "Mixtral-stock.yaml"
NAME = "tiny-mixtral"
LIMIT = 64
# Logit tolerance of a greedy token under the hybrimoe rules against the stock rules' teacher-forced
# logits. Measured on this model: over 3,000 prompts served in random order, the chosen token's logit
# was below the reference maximum by 0 at the median, by 0.0013 at the 99th percentile and by 0.24 at
# most (a router near-tie that flipped: that moves this model's logits by up to ~0.33); corrupted
# expert weights move them by the whole logit range (~3).
LOGIT_TOL = 0.5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(make_tiny_model("mixtral", tmp_path_factory.mktemp("serve") / "m", seed=1)["dir"])


@pytest.fixture(scope="module")
def hybrid(model_dir: Path) -> Any:
    return load_hybrid(model_dir, RULES, progress=False)


@pytest.fixture(scope="module")
def stock(model_dir: Path) -> Any:
    return load_hybrid(model_dir, STOCK_RULES, progress=False)


def _serve(model: Any) -> Iterator[Server]:
    srv = Server(Engine(model, queue_size=64), NAME, host="127.0.0.1", port=0, max_tokens_limit=LIMIT)
    srv.start_background()
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def server(stock: Any) -> Iterator[Server]:
    """Stock rules: outputs are exact, whatever ran before."""
    yield from _serve(stock)


@pytest.fixture(scope="module")
def hybrid_server(hybrid: Any) -> Iterator[Server]:
    yield from _serve(hybrid)


def call(srv: Server, method: str, path: str, body: Any = None, raw: Optional[bytes] = None,
         timeout: float = 120) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=timeout)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    ctype = resp.getheader("Content-Type", "")
    return resp.status, json.loads(text) if ctype.startswith("application/json") else text


def greedy_text(hybrid: Any, ids: list[int], n: int) -> tuple[str, int]:
    with torch.no_grad():
        out = hybrid.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=n, do_sample=False)
    new = out[0, len(ids):].tolist()
    return hybrid.tokenizer.decode(new, skip_special_tokens=True), len(new)


def test_health_models_metrics(hybrid_server: Server) -> None:
    server = hybrid_server
    assert call(server, "GET", "/health") == (200, {"status": "ok"})
    status, models = call(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == [NAME]
    status, m = call(server, "GET", "/metrics")
    assert status == 200
    assert m["queue"]["capacity"] == 64 and "CPU stand-in" in m["gpu_tier"]
    assert {"served", "failed", "rejected", "cancelled"} <= set(m["requests"])
    assert {"hit_rate"} <= set(m["cache"]) and {"copies", "gb"} <= set(m["transfers"])


def test_completion_matches_generate(server: Server, stock: Any) -> None:
    prompt = "the quick brown fox"
    status, r = call(server, "POST", "/v1/completions", {"model": NAME, "prompt": prompt, "max_tokens": 4})
    assert status == 200, r
    ids = stock.tokenizer(prompt).input_ids
    want, n = greedy_text(stock, ids, 4)
    assert r["object"] == "text_completion" and r["choices"][0]["text"] == want
    assert r["usage"] == {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}


def test_chat_matches_generate(server: Server, stock: Any) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    status, r = call(server, "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 4,
                                                               "temperature": 0, "unknown_field": [1]})
    assert status == 200, r
    ids = list(stock.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])
    want, n = greedy_text(stock, ids, 4)
    msg = r["choices"][0]["message"]
    assert r["object"] == "chat.completion" and msg == {"role": "assistant", "content": want}
    assert r["usage"]["prompt_tokens"] == len(ids) and r["usage"]["completion_tokens"] == n
    assert r["choices"][0]["finish_reason"] in ("stop", "length")


def test_seeded_sampling_is_reproducible(server: Server) -> None:
    body = {"prompt": "once upon", "max_tokens": 5, "temperature": 1.5, "top_p": 0.9, "seed": 7, "ignore_eos": True}
    a, b = (call(server, "POST", "/v1/completions", body)[1]["choices"][0]["text"] for _ in range(2))
    assert a == b


def test_streaming_chat(server: Server) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    status, text = call(server, "POST", "/v1/chat/completions", body)
    assert status == 200
    events = [line[len("data: "):] for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage = chunks.pop()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] >= 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    _, whole = call(server, "POST", "/v1/chat/completions", dict(body, stream=False))
    assert streamed == whole["choices"][0]["message"]["content"]
    assert usage["usage"] == whole["usage"]


def test_stop_string(server: Server) -> None:
    body = {"prompt": "a b c", "max_tokens": 8, "ignore_eos": True}
    full = call(server, "POST", "/v1/completions", body)[1]["choices"][0]["text"]
    if len(full) < 3:
        pytest.skip(f"greedy text {full!r} too short to cut")
    stop = full[2:4]
    r = call(server, "POST", "/v1/completions", dict(body, stop=[stop]))[1]["choices"][0]
    assert r["text"] == full[:full.find(stop)] and r["finish_reason"] == "stop"


CHAT, COMP = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "x"}]
BAD = [
    (CHAT, b"{not json", None),
    (CHAT, b"[1, 2]", None),
    (CHAT, {"model": "gpt-4", "messages": USER}, "model"),
    (CHAT, {}, "messages"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": "hi"}, "messages"),
    (CHAT, {"messages": [{"content": "x"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user"}]}, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (COMP, {}, "prompt"),
    (COMP, {"prompt": ""}, "prompt"),
    (COMP, {"prompt": 3}, "prompt"),
    (COMP, {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    (COMP, {"prompt": "x", "max_tokens": -3}, "max_tokens"),
    (COMP, {"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    (COMP, {"prompt": "x", "max_tokens": "4"}, "max_tokens"),
    (COMP, {"prompt": "x", "max_tokens": LIMIT + 1}, "max_tokens"),
    (CHAT, {"messages": USER, "temperature": 2.5}, "temperature"),
    (CHAT, {"messages": USER, "temperature": -0.1}, "temperature"),
    (CHAT, {"messages": USER, "temperature": "hot"}, "temperature"),
    (CHAT, {"messages": USER, "stream": "yes"}, "stream"),
    (CHAT, {"messages": USER, "top_p": 0}, "top_p"),
    (CHAT, {"messages": USER, "seed": "s"}, "seed"),
    (CHAT, {"messages": USER, "seed": 2**64}, "seed"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    (CHAT, {"messages": USER, "response_format": {"type": "json_object"}}, "response_format"),
    (CHAT, {"messages": USER, "logprobs": True}, "logprobs"),
    (COMP, {"prompt": "x", "logit_bias": {"5": 10}}, "logit_bias"),
    (CHAT, {"messages": USER, "stop": 4}, "stop"),
    (CHAT, {"messages": USER, "stream_options": True}, "stream_options"),
    (CHAT, {"messages": USER, "n": 2}, "n"),
    (COMP, {"prompt": "x", "return_token_ids": 1}, "return_token_ids"),
    (COMP, {"prompt": "x", "return_token_ids": True, "stream": True}, "return_token_ids"),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_requests(server: Server, path: str, body: Any, param: Optional[str]) -> None:
    raw = body if isinstance(body, bytes) else None
    status, r = call(server, "POST", path, None if raw else body, raw=raw)
    assert status == 400, r
    err = r["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and err["message"]


def test_unknown_path_and_method(server: Server) -> None:
    assert call(server, "GET", "/v1/nothing")[0] == 404
    assert call(server, "POST", "/v2/completions", {"prompt": "x"})[0] == 404
    status, r = call(server, "GET", CHAT)
    assert status == 405 and r["error"]["code"] == "method_not_allowed"
    assert call(server, "POST", "/health", {})[0] == 405
    assert call(server, "DELETE", "/v1/models")[0] == 405


def test_return_token_ids(server: Server, stock: Any) -> None:
    body = {"prompt": "a b c", "max_tokens": 3, "ignore_eos": True, "return_token_ids": True}
    status, r = call(server, "POST", COMP, body)
    assert status == 200, r
    choice = r["choices"][0]
    assert choice["prompt_token_ids"] == stock.tokenizer("a b c").input_ids
    assert len(choice["token_ids"]) == r["usage"]["completion_tokens"] == 3
    assert choice["text"] == stock.tokenizer.decode(choice["token_ids"], skip_special_tokens=True)
    status, c = call(server, "POST", CHAT, {"messages": USER, "max_tokens": 2, "return_token_ids": True})
    assert status == 200 and len(c["prompt_token_ids"]) == c["usage"]["prompt_tokens"]
    assert len(c["choices"][0]["token_ids"]) == c["usage"]["completion_tokens"]
    assert "token_ids" not in call(server, "POST", COMP, {"prompt": "a b c", "max_tokens": 1})[1]["choices"][0]


def concurrent(srv: Server, bodies: list[dict[str, Any]]) -> list[tuple[int, Any]]:
    """POST every body to /v1/completions at once; the responses in order."""
    results: dict[int, Any] = {}

    def worker(i: int) -> None:
        results[i] = call(srv, "POST", COMP, bodies[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == list(range(len(bodies)))
    return [results[i] for i in range(len(bodies))]


def logit_deficits(ref: Any, prompt: list[int], tokens: list[int]) -> list[float]:
    """Per generated token: how far its logit is below the best one, teacher-forced through ``ref``."""
    with torch.no_grad():
        logits = ref.model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()  # [n, V]
    return (logits.max(-1).values - logits[torch.arange(len(tokens)), torch.tensor(tokens)]).tolist()


@pytest.mark.parametrize("rules", ["stock", "hybrimoe"])
def test_concurrent_requests_are_complete_and_unmixed(rules: str, request: pytest.FixtureRequest,
                                                      stock: Any) -> None:
    """50 clients at once. Stock rules: each response equals the same request served alone, exactly.
    Hybrimoe rules: each response carries its own prompt's tokens and text, every token is greedy within
    LOGIT_TOL under the stock rules' teacher-forced logits, and most equal the stock greedy tokens."""
    srv: Server = request.getfixturevalue("server" if rules == "stock" else "hybrid_server")
    prompts = [f"request {i} says" for i in range(50)]
    bodies = [{"prompt": p, "max_tokens": 3, "ignore_eos": True, "return_token_ids": True} for p in prompts]
    together = concurrent(srv, bodies)
    alone = [call(srv, "POST", COMP, b) for b in bodies]
    exact = 0
    for p, (status, r), (status_alone, a) in zip(prompts, together, alone):
        assert status == 200 and status_alone == 200, (r, a)
        choice = r["choices"][0]
        assert r["usage"]["completion_tokens"] == 3 and choice["finish_reason"] == "length"
        ids, tokens = stock.tokenizer(p).input_ids, choice["token_ids"]
        assert choice["prompt_token_ids"] == ids
        assert choice["text"] == stock.tokenizer.decode(tokens, skip_special_tokens=True)
        if rules == "stock":
            assert a["choices"][0] == choice  # the same request alone: same tokens, same text
            continue
        for got in (tokens, a["choices"][0]["token_ids"]):
            deficits = logit_deficits(stock, ids, got)
            assert max(deficits) <= LOGIT_TOL, (p, got, deficits)
        exact += tokens == list(token_loop(stock.model, ids, Sampler(0.0), 3))
    if rules == "hybrimoe":  # near-ties are rare: a handful of requests may differ, not most
        assert exact >= 0.75 * len(prompts), f"only {exact} of {len(prompts)} equal the stock greedy tokens"


def test_queue_full_gives_429(hybrid: Any) -> None:
    engine = Engine(hybrid, queue_size=1)
    engine.pause()  # the worker takes nothing: the first request fills the queue
    srv = Server(engine, NAME, host="127.0.0.1", port=0, max_tokens_limit=LIMIT)
    srv.start_background()
    try:
        first: dict[str, Any] = {}
        t = threading.Thread(target=lambda: first.update(r=call(srv, "POST", COMP, {"prompt": "x", "max_tokens": 1})))
        t.start()
        deadline = time.time() + 10
        while engine.queue_length() < 1 and time.time() < deadline:
            time.sleep(0.01)
        status, r = call(srv, "POST", COMP, {"prompt": "y", "max_tokens": 1})
        assert status == 429 and r["error"]["code"] == "queue_full"
        assert call(srv, "GET", "/metrics")[1]["requests"]["rejected"] == 1
        engine.resume()
        t.join(60)
        assert first["r"][0] == 200
    finally:
        srv.shutdown()


def test_client_disconnect_cancels_generation(server: Server) -> None:
    before = call(server, "GET", "/metrics")[1]
    body = json.dumps({"prompt": "tell me a long story", "max_tokens": LIMIT, "stream": True,
                       "ignore_eos": True}).encode()
    sock = socket.create_connection((server.host, server.port), timeout=60)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while b"data: {" not in got:
        chunk = sock.recv(4096)
        assert chunk, "server closed before the first chunk"
        got += chunk
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset
    sock.close()
    deadline = time.time() + 60
    while time.time() < deadline:
        m = call(server, "GET", "/metrics")[1]
        if m["requests"]["cancelled"] > before["requests"]["cancelled"]:
            break
        time.sleep(0.05)
    assert m["requests"]["cancelled"] == before["requests"]["cancelled"] + 1
    assert m["tokens_generated"] - before["tokens_generated"] < LIMIT  # stopped early
    status, r = call(server, "POST", COMP, {"prompt": "next", "max_tokens": 2}, timeout=30)
    assert status == 200 and r["usage"]["completion_tokens"] >= 1


def test_serve_bad_flags(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hybrimoe_kt.cli import main

    cases = [["--model-path", str(model_dir / "missing"), "--optimize-config-path", str(RULES)],
             ["--model-path", str(model_dir), "--optimize-config-path", str(RULES), "--port", "abc"],
             ["--model-path", str(model_dir), "--optimize-config-path", str(RULES), "--port", "70000"],
             ["--model-path", str(model_dir), "--optimize-config-path", str(RULES) + ".nope"]]
    for flags in cases:
        assert main(["serve", *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("hybrimoe-kt serve: error:"), err


def test_unsupported_fields_at_their_neutral_values_are_accepted(server: Server) -> None:
    status, r = call(server, "POST", CHAT, {"messages": USER, "max_tokens": 2, "logprobs": False, "tools": [],
                                            "response_format": None, "presence_penalty": 0, "seed": 2**64 - 1})
    assert status == 200, r
    assert r["usage"]["completion_tokens"] >= 1
