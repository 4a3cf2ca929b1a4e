"""The official ``openai`` Python client against the server (real HTTP on loopback): chat and text
completions, streaming and not, the model list, usage, errors; every raw response body also validated
strictly against the client's own pydantic types."""

from __future__ import annotations

import json
from typing import Any

import pytest

openai = pytest.importorskip("openai")
from openai.types import Completion, Model  # noqa: E402
from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402

from .conftest import CHAT, NAME, USER, call, sse_events  # noqa: E402


@pytest.fixture(scope="module")
def client(server: Any) -> Any:
    return openai.OpenAI(base_url=f"http://{server.host}:{server.port}/v1", api_key="unused", max_retries=0,
                         timeout=60)


def test_chat(client: Any) -> None:
    raw = client.chat.completions.with_raw_response.create(model=NAME, messages=USER, max_tokens=4)
    ChatCompletion.model_validate(raw.http_response.json(), strict=True)
    r = raw.parse()
    assert r.object == "chat.completion" and r.model == NAME and len(r.choices) == 1
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens and r.usage.completion_tokens >= 1


def test_chat_stream_with_usage(client: Any, server: Any) -> None:
    stream = client.chat.completions.create(model=NAME, messages=USER, max_tokens=5, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model=NAME, messages=USER, max_tokens=5)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    body = {"model": NAME, "messages": USER, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    status, text = call(server, "POST", CHAT, body)
    events = sse_events(text)
    assert status == 200
    assert events[-1] == "[DONE]"
    for e in events[:-1]:
        ChatCompletionChunk.model_validate(json.loads(e), strict=True)


def test_completions(client: Any, server: Any) -> None:
    raw = client.completions.with_raw_response.create(model=NAME, prompt="the quick brown", max_tokens=3)
    Completion.model_validate(raw.http_response.json(), strict=True)
    r = raw.parse()
    assert r.object == "text_completion" and r.usage.completion_tokens >= 1 and isinstance(r.choices[0].text, str)
    pieces = [c.choices[0].text for c in client.completions.create(model=NAME, prompt="the quick brown",
                                                                      max_tokens=3, stream=True)]
    assert "".join(pieces) == r.choices[0].text


def test_models(client: Any) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    Model.model_validate(models.data[0].model_dump(), strict=True)


def test_errors_reach_the_client(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=USER, seed=2**64)
    assert e.value.status_code == 400 and e.value.body["param"] == "seed"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=USER,
                                       tools=[{"type": "function", "function": {"name": "f"}}])
    assert e.value.body["code"] == "unsupported_parameter" and e.value.body["param"] == "tools"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=USER)
    assert client.chat.completions.create(model=NAME, messages=USER, max_tokens=2).usage.completion_tokens >= 1
