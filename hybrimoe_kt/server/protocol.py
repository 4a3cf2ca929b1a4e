"""OpenAI-compatible request validation and response shapes for the server.

``parse_request`` turns a decoded JSON body into a frozen ``GenRequest`` or raises ``RequestError`` that
names the bad field and value. Unknown fields are ignored (as OpenAI does); fields of the OpenAI schema
this server does not implement (``UNSUPPORTED``: tools, structured output, log-probabilities, logit
bias, ...) are refused rather than silently ignored; known fields with the wrong type are errors. The ``*_response`` / ``*_chunk`` helpers build the JSON objects the endpoints send.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

Kind = Literal["chat", "completion"]
ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_STOP = 4


class RequestError(Exception):
    """A request the client got wrong: sent as ``{"error": {...}}`` with ``status``."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 code: Optional[str] = None, type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code
        self.type = type_

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass(frozen=True)
class GenRequest:
    kind: Kind
    model: str
    messages: Optional[tuple[dict[str, str], ...]]   # chat
    prompt: Optional[str]                            # completion
    max_tokens: int
    temperature: float
    top_p: float
    seed: Optional[int]
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool        # stream_options.include_usage: a last chunk with usage and no choices
    ignore_eos: bool
    return_token_ids: bool = False  # vLLM's extension: the prompt's and the completion's token ids


def decode_body(raw: bytes) -> dict[str, Any]:
    """The JSON object in ``raw``; RequestError for bad UTF-8/JSON or a non-object."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {type(body).__name__}",
                           code="invalid_body")
    return body


def _typed(body: dict[str, Any], name: str, types: tuple[type, ...], what: str, default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    # bool is an int subclass: accept it only where bool is asked for
    if isinstance(value, bool) and bool not in types:
        raise RequestError(f"'{name}' must be {what}, got {value!r}", param=name)
    if not isinstance(value, types):
        raise RequestError(f"'{name}' must be {what}, got {value!r}", param=name)
    return value


def _messages(body: dict[str, Any]) -> tuple[dict[str, str], ...]:
    msgs = body.get("messages")
    if msgs is None:
        raise RequestError("'messages' is required", param="messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError(f"'messages' must be a non-empty list, got {msgs!r}"[:200], param="messages")
    out = []
    for i, m in enumerate(msgs):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"'{p}' must be an object, got {m!r}"[:200], param=p)
        role, content = m.get("role"), m.get("content")
        if role is None:
            raise RequestError(f"'{p}.role' is required", param=f"{p}.role")
        if role not in ROLES:
            raise RequestError(f"'{p}.role' {role!r} is not one of {', '.join(ROLES)}", param=f"{p}.role")
        if content is None:
            raise RequestError(f"'{p}.content' is required", param=f"{p}.content")
        if isinstance(content, list):  # content parts: only text parts are supported
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise RequestError(f"'{p}.content' parts must be {{'type': 'text', 'text': str}}, "
                                       f"got {part!r}"[:200], param=f"{p}.content")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise RequestError(f"'{p}.content' must be a string, got {content!r}"[:200], param=f"{p}.content")
        out.append({"role": role, "content": content})
    return tuple(out)


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if prompt is None:
        raise RequestError("'prompt' is required", param="prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError(f"'prompt' must be a string (batched prompts are not supported), got {prompt!r}"[:200],
                           param="prompt")
    if not prompt:
        raise RequestError("'prompt' must not be empty", param="prompt")
    return prompt


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise RequestError(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} non-empty "
                           f"strings, got {stop!r}"[:200], param="stop")
    return tuple(stop)


UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "logprobs",
               "top_logprobs", "logit_bias", "best_of", "echo", "suffix", "presence_penalty", "frequency_penalty",
               "audio", "modalities", "prediction")
"""OpenAI request fields this server does not implement: a request that sets one gets a 400 naming it
(null, false, 0 and an empty list or object, the fields' neutral values, are accepted)."""
SEED_RANGE = (-(2**63), 2**64 - 1)  # what the sampler's generator accepts


def parse_request(body: dict[str, Any], kind: Kind, model_name: str, max_tokens_limit: int) -> GenRequest:
    """Validate one chat or completion request body against the served model and token limit."""
    for key in UNSUPPORTED:
        v = body.get(key)
        if v is not None and v is not False and v != 0 and v != [] and v != {}:
            raise RequestError(f"'{key}' is not supported by this server", param=key, code="unsupported_parameter")
    model = body.get("model", model_name)
    if not isinstance(model, str):
        raise RequestError(f"'model' must be a string, got {model!r}", param="model")
    if model != model_name:
        raise RequestError(f"model {model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
    messages = _messages(body) if kind == "chat" else None
    prompt = _prompt(body) if kind == "completion" else None
    default_max = min(16, max_tokens_limit) if kind == "completion" else max_tokens_limit
    key = "max_completion_tokens" if kind == "chat" and "max_completion_tokens" in body else "max_tokens"
    max_tokens = _typed(body, key, (int,), "a positive integer", default_max)
    if max_tokens < 1 or max_tokens > max_tokens_limit:
        raise RequestError(f"'{key}' must be between 1 and {max_tokens_limit}, got {max_tokens}", param=key)
    temperature = float(_typed(body, "temperature", (int, float), "a number in [0, 2]", 0.0))
    if not 0.0 <= temperature <= 2.0:
        raise RequestError(f"'temperature' must be in [0, 2], got {temperature}", param="temperature")
    top_p = float(_typed(body, "top_p", (int, float), "a number in (0, 1]", 1.0))
    if not 0.0 < top_p <= 1.0:
        raise RequestError(f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
    seed = _typed(body, "seed", (int,), "an integer", None)
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise RequestError(f"'seed' must be an integer in [-2^63, 2^64 - 1], got {seed}"[:200], param="seed")
    n = _typed(body, "n", (int,), "an integer", 1)
    if n != 1:
        raise RequestError(f"'n' must be 1 (one choice per request), got {n}", param="n")
    options = _typed(body, "stream_options", (dict,), "an object", {})
    include_usage = _typed(options, "include_usage", (bool,), "a boolean", False)
    stream = _typed(body, "stream", (bool,), "a boolean", False)
    return_token_ids = _typed(body, "return_token_ids", (bool,), "a boolean", False)
    if return_token_ids and stream:
        raise RequestError("'return_token_ids' is supported without streaming only", param="return_token_ids")
    return GenRequest(kind=kind, model=model_name, messages=messages, prompt=prompt, max_tokens=max_tokens,
                      temperature=temperature, top_p=top_p, seed=seed, stop=_stop(body),
                      stream=stream, include_usage=include_usage,
                      ignore_eos=_typed(body, "ignore_eos", (bool,), "a boolean", False),
                      return_token_ids=return_token_ids)


def new_id(kind: Kind) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def full_response(req: GenRequest, rid: str, created: int, text: str, finish: str,
                  prompt_ids: Sequence[int], token_ids: Sequence[int]) -> dict[str, Any]:
    """The whole answer; with ``return_token_ids`` also the token ids where vLLM puts them (chat: the
    prompt's on the response, completion: both on the choice)."""
    out: dict[str, Any] = {"id": rid, "created": created, "model": req.model}
    if req.kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "logprobs": None, "finish_reason": finish}
        out["object"] = "chat.completion"
        if req.return_token_ids:
            out["prompt_token_ids"] = list(prompt_ids)
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        out["object"] = "text_completion"
        if req.return_token_ids:
            choice["prompt_token_ids"] = list(prompt_ids)
    if req.return_token_ids:
        choice["token_ids"] = list(token_ids)
    out["choices"] = [choice]
    out["usage"] = usage(len(prompt_ids), len(token_ids))
    return out


def stream_chunk(req: GenRequest, rid: str, created: int, text: Optional[str], finish: Optional[str],
                 first: bool = False) -> dict[str, Any]:
    """One SSE chunk: a text delta (``first`` adds the assistant role for chat) or the final finish."""
    if req.kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice]}


def usage_chunk(req: GenRequest, rid: str, created: int, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def now() -> int:
    return int(time.time())
