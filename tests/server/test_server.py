"""The OpenAI-compatible server over real HTTP on 127.0.0.1 (ephemeral ports), on a tiny Mixtral:
endpoints, greedy output vs ``model.generate``, streaming, stop strings, request validation (every bad
field a 400 naming it), unknown paths and methods.

Tests that compare texts run under the stock rules, where every routed expert runs on the CPU kernel:
a request served alone gives what ``model.generate`` gives. Batching and the hybrid rules, where rows
round differently, are tested in test_batching.py at logit tolerance."""

from __future__ import annotations

import json
from typing import Any, Optional

import pytest
import torch

from hybrimoe_kt.server.listener import Server

from .conftest import CHAT, COMP, LIMIT, NAME, USER, ServerFactory, call


def greedy_text(ref: Any, ids: list[int], n: int) -> tuple[str, int]:
    with torch.no_grad():
        out = ref.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=n, do_sample=False)
    new = out[0, len(ids):].tolist()
    return ref.tokenizer.decode(new, skip_special_tokens=True), len(new)


def test_health_models_metrics_json(hybrid: Any, make_server: ServerFactory) -> None:
    server = make_server(hybrid)
    status, h = call(server, "GET", "/health")
    assert status == 200 and h["status"] == "ok" and h["worker_alive"] is True
    assert h["queue_depth"] == 0 and h["running"] == 0 and h["max_batch"] == 8 and h["last_step_age_s"] < 5
    status, models = call(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == [NAME]
    assert call(server, "POST", COMP, {"prompt": "hi", "max_tokens": 2})[0] == 200
    status, m = call(server, "GET", "/metrics.json")
    assert status == 200
    assert m["queue"]["capacity"] == 64 and "CPU stand-in" in m["gpu_tier"] and m["batch"]["max"] == 8
    assert m["requests"]["served"] == 1 and {"failed", "rejected", "cancelled", "invalid"} <= set(m["requests"])
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


BAD = [
    (CHAT, b"{not json", None),
    (CHAT, b"[1, 2]", None),
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


def test_unknown_model_is_404(server: Server) -> None:
    status, r = call(server, "POST", CHAT, {"model": "gpt-4", "messages": USER})
    assert status == 404 and r["error"]["code"] == "model_not_found" and r["error"]["param"] == "model"


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
