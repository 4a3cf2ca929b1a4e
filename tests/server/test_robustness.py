"""No request takes the server down: bad input gets a JSON error and the next good request succeeds;
disconnects cancel; a dead worker shows in /health; a full queue says when to retry; idle sockets are
closed; HTTP/1.1 details (keep-alive, chunked bodies, Expect: 100-continue); the API key."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from typing import Any

import pytest

from .conftest import CHAT, COMP, NAME, USER, ServerFactory, call, call_full


def wait_for(cond: Any, timeout: float = 20.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_huge_seed_then_a_good_request(server: Any) -> None:
    status, r = call(server, "POST", CHAT, {"messages": USER, "seed": 2**64, "temperature": 1.0})
    assert status == 400 and r["error"]["param"] == "seed"
    status, r = call(server, "POST", CHAT, {"messages": USER, "seed": 2**64 - 1, "temperature": 1.0, "max_tokens": 2})
    assert status == 200, r  # the largest seed the generator takes works
    status, r = call(server, "POST", CHAT, {"messages": USER, "max_tokens": 2})
    assert status == 200 and r["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("raw,code", [
    (b"[" * 100_000 + b"]" * 100_000, "invalid_json"),  # nesting deeper than the JSON parser's recursion
    (b"\xff\xfe", "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1e400}', None),
])
def test_malformed_bodies(server: Any, raw: bytes, code: Any) -> None:
    status, _, r = call_full(server, "POST", CHAT, raw=raw)
    assert status == 400 and r["error"]["type"] == "invalid_request_error" and r["error"]["code"] == code, r
    assert call(server, "GET", "/health")[0] == 200


def test_not_json_content_type_is_refused(server: Any) -> None:
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", ""):
        status, _, r = call_full(server, "POST", COMP, raw=body, headers={"Content-Type": ctype})
        assert status == 415 and r["error"]["code"] == "unsupported_media_type", (ctype, r)


def test_body_too_large(server: Any) -> None:
    status, _, r = call_full(server, "POST", COMP, raw=b" " * (4 << 20 + 1))
    assert status == 413 and r["error"]["code"] == "body_too_large"


def test_default_max_tokens_is_the_context_left(server: Any, stock: Any) -> None:
    context = stock.model.config.max_position_embeddings
    status, r = call(server, "POST", CHAT, {"messages": USER, "ignore_eos": True})
    assert status == 200, r
    assert r["usage"]["completion_tokens"] == min(64, context - r["usage"]["prompt_tokens"])
    assert r["choices"][0]["finish_reason"] == "length"


def test_prompt_longer_than_the_context(server: Any, stock: Any) -> None:
    context = stock.model.config.max_position_embeddings
    long_prompt = " ".join(["word"] * (context + 10))
    status, r = call(server, "POST", COMP, {"prompt": long_prompt})
    assert status == 400 and r["error"]["code"] == "context_length_exceeded" and r["error"]["param"] == "prompt"
    huge = "a" * (3_900_000)  # refused from its length alone, before tokenizing
    t0 = time.perf_counter()
    status, r = call(server, "POST", COMP, {"prompt": huge})
    assert status == 400 and r["error"]["code"] == "context_length_exceeded"
    assert time.perf_counter() - t0 < 5
    words = next(k for k in range(context, 0, -1) if len(stock.tokenizer(" ".join(["word"] * k)).input_ids) < context - 8)
    near_full = " ".join(["word"] * words)
    left = context - len(stock.tokenizer(near_full).input_ids)
    status, r = call(server, "POST", COMP, {"prompt": near_full, "max_tokens": left + 1})
    assert status == 400 and r["error"]["code"] == "context_length_exceeded", r
    status, r = call(server, "POST", COMP, {"prompt": near_full, "ignore_eos": True})
    assert status == 200 and r["usage"]["completion_tokens"] == left  # the default: what the context has left


def test_queue_full_gives_429_with_retry_after(stock: Any, make_server: ServerFactory) -> None:
    srv = make_server(stock, max_batch=1, queue_size=1)
    srv.engine.pause()  # the worker takes nothing: the first request fills the queue
    first: dict[str, Any] = {}
    t = threading.Thread(target=lambda: first.update(r=call(srv, "POST", COMP, {"prompt": "x", "max_tokens": 1})))
    t.start()
    assert wait_for(lambda: srv.engine.queue_length() == 1)
    status, headers, r = call_full(srv, "POST", COMP, {"prompt": "y", "max_tokens": 1})
    assert status == 429 and r["error"]["code"] == "queue_full" and int(headers["retry-after"]) >= 1
    srv.engine.resume()
    t.join(30)
    assert first["r"][0] == 200


def slow_steps(srv: Any, monkeypatch: pytest.MonkeyPatch, seconds: float = 0.02) -> None:
    """Each decode step of ``srv``'s engine takes at least ``seconds`` (a long generation on a tiny model)."""
    real = srv.engine._decode

    def slow() -> None:
        time.sleep(seconds)
        real()

    monkeypatch.setattr(srv.engine, "_decode", slow)


def post_raw(srv: Any, body: dict[str, Any]) -> socket.socket:
    s = socket.create_connection((srv.host, srv.port))
    data = json.dumps(body).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return s


def test_non_streaming_disconnect_cancels(stock: Any, make_server: ServerFactory,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    srv = make_server(stock, max_batch=4, max_tokens_limit=400)
    slow_steps(srv, monkeypatch)
    s = post_raw(srv, {"prompt": "go on", "max_tokens": 400, "ignore_eos": True})
    assert wait_for(lambda: srv.engine.running() == 1)
    s.close()
    assert wait_for(lambda: srv.engine.metrics.snapshot()["requests"]["cancelled"] == 1)
    snap = srv.engine.metrics.snapshot()
    assert snap["requests"]["served"] == 0 and snap["tokens_generated"] < 400
    assert srv.engine.running() == 0
    status, r = call(srv, "POST", COMP, {"prompt": "next", "max_tokens": 2})
    assert status == 200


def test_disconnect_while_queued_cancels(stock: Any, make_server: ServerFactory) -> None:
    srv = make_server(stock)
    srv.engine.pause()
    s = post_raw(srv, {"prompt": "waiting", "max_tokens": 8})
    assert wait_for(lambda: srv.engine.queue_length() == 1)
    s.close()
    time.sleep(0.6)  # the HTTP side notices within its poll interval and marks the job cancelled
    srv.engine.resume()
    assert wait_for(lambda: srv.engine.metrics.snapshot()["requests"]["cancelled"] == 1)
    assert srv.engine.metrics.snapshot()["tokens_generated"] == 0


def test_streaming_disconnect_cancels(stock: Any, make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    srv = make_server(stock, max_batch=4, max_tokens_limit=400)
    slow_steps(srv, monkeypatch)
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    conn.request("POST", COMP, body=json.dumps({"prompt": "go", "max_tokens": 400, "ignore_eos": True,
                                                "stream": True}), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert wait_for(lambda: srv.engine.metrics.snapshot()["requests"]["cancelled"] == 1)
    assert srv.engine.metrics.snapshot()["tokens_generated"] < 400


def test_dead_worker_fails_health(stock: Any, make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    srv = make_server(stock)
    assert call(srv, "GET", "/health")[0] == 200

    def broken() -> None:
        raise RuntimeError("engine fault")

    monkeypatch.setattr(srv.engine, "_step", broken)
    assert wait_for(lambda: not srv.engine.alive())
    status, h = call(srv, "GET", "/health")
    assert status == 503 and h["status"] == "dead" and "engine fault" in h["error"] and not h["worker_alive"]
    status, r = call(srv, "POST", COMP, {"prompt": "x", "max_tokens": 1})
    assert status == 503 and r["error"]["type"] == "server_error"


def test_a_failing_forward_fails_its_requests_only(stock: Any, make_server: ServerFactory,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    srv = make_server(stock)
    import hybrimoe_kt.server.engine as engine_mod

    real = engine_mod.prefill

    def flaky(model: Any, ids: list[int]) -> Any:
        if len(ids) > 20:
            raise RuntimeError("out of memory (simulated)")
        return real(model, ids)

    monkeypatch.setattr(engine_mod, "prefill", flaky)
    status, r = call(srv, "POST", COMP, {"prompt": " ".join(["w"] * 30), "max_tokens": 2})
    assert status == 500 and "out of memory" in r["error"]["message"] and r["error"]["type"] == "server_error"
    assert call(srv, "POST", COMP, {"prompt": "short", "max_tokens": 2})[0] == 200
    assert call(srv, "GET", "/health")[0] == 200


def test_keep_alive_chunked_and_expect_continue(server: Any) -> None:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    for _ in range(3):  # one connection, several requests (HTTP/1.1 keep-alive)
        conn.request("GET", "/v1/models")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.version == 11 and json.loads(resp.read())["data"][0]["id"] == NAME
    body = json.dumps({"prompt": "chunked", "max_tokens": 2}).encode()
    conn.putrequest("POST", COMP)
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(hex(len(body))[2:].encode() + b"\r\n" + body + b"\r\n0\r\n\r\n")
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["usage"]["completion_tokens"] >= 1
    conn.close()
    s = socket.create_connection((server.host, server.port), timeout=10)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Expect: 100-continue\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    t0 = time.perf_counter()
    assert s.recv(64).startswith(b"HTTP/1.1 100")
    assert time.perf_counter() - t0 < 0.5
    s.sendall(body)
    data = b""
    while b'"usage"' not in data:
        chunk = s.recv(65536)
        assert chunk
        data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    s.close()


def test_idle_sockets_are_closed(stock: Any, make_server: ServerFactory) -> None:
    srv = make_server(stock, idle_timeout_s=1)
    idle = [socket.create_connection((srv.host, srv.port), timeout=10) for _ in range(50)]
    slow = socket.create_connection((srv.host, srv.port), timeout=10)
    slow.sendall(b"GET /health HTTP/1.1\r\n")  # headers never completed
    threads_before = threading.active_count()
    for s in idle + [slow]:
        assert s.recv(1) == b""  # the server closed it (after the idle timeout)
        s.close()
    assert threading.active_count() <= threads_before  # no thread per connection
    assert call(srv, "GET", "/health")[0] == 200


def test_api_key(stock: Any, make_server: ServerFactory) -> None:
    srv = make_server(stock, api_key="s3cret")
    status, r = call(srv, "POST", COMP, {"prompt": "x", "max_tokens": 1})
    assert status == 401 and r["error"]["type"] == "authentication_error"
    bad = {"Content-Type": "application/json", "Authorization": "Bearer nope"}
    assert call(srv, "GET", "/v1/models", headers=bad)[0] == 401
    good = {"Content-Type": "application/json", "Authorization": "Bearer s3cret"}
    assert call(srv, "POST", COMP, {"prompt": "x", "max_tokens": 1}, headers=good)[0] == 200
    assert call(srv, "GET", "/health")[0] == 200  # health and metrics stay open for probes and scrapers
