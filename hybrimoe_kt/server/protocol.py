"""OpenAI-compatible request validation (pydantic models of the request bodies) for the server.

``parse_request`` turns a decoded JSON body into a frozen ``GenRequest`` or raises ``RequestError``
naming the bad field (``param``, e.g. ``messages[0].role``) and value. Unknown fields are ignored, as
OpenAI does; the fields of OpenAI's schema this server does not implement (``UNSUPPORTED``: tools,
structured output, log-probabilities, logit bias, ...) are refused with ``unsupported_parameter`` rather
than silently ignored; known fields of the wrong type or range are errors. Errors are always
``{"error": {"message", "type", "param", "code"}}``. Response bodies: ``server.responses``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, field_validator

from hybrimoe_kt.decoding.sampler import SEED_RANGE

Kind = Literal["chat", "completion"]
Role = Literal["system", "user", "assistant", "tool", "developer"]
MAX_STOP = 4
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "logprobs",
               "top_logprobs", "logit_bias", "best_of", "echo", "suffix", "presence_penalty", "frequency_penalty",
               "audio", "modalities", "prediction")
"""OpenAI request fields this server does not implement: a request that sets one gets a 400 naming it
(null, false, 0 and an empty list or object, the fields' neutral values, are accepted)."""


class RequestError(Exception):
    """A request the client got wrong (or one the server cannot take now): sent as ``{"error": ...}``."""

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
    max_tokens: Optional[int]                        # None: the context left, capped by the server's limit
    temperature: float
    top_p: float
    seed: Optional[int]
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool        # stream_options.include_usage: a last chunk with usage and no choices
    ignore_eos: bool
    return_token_ids: bool = False  # vLLM's extension: the prompt's and the completion's token ids

    def text_length(self) -> int:
        """Characters of prompt text (all messages' contents for chat)."""
        if self.kind == "chat":
            return sum(len(m["content"]) for m in self.messages or ())
        return len(self.prompt or "")


# request bodies ------------------------------------------------------------------------------------
class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Message(_Open):
    role: Role
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, v: Any) -> Any:
        if isinstance(v, list):  # content parts: only text parts are supported
            texts = []
            for part in v:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ValueError(f"content parts must be {{'type': 'text', 'text': str}}, got {part!r}"[:160])
                texts.append(part["text"])
            return "".join(texts)
        if not isinstance(v, str):
            raise ValueError("must be a string or a list of text parts")
        return v


class StreamOptions(_Open):
    include_usage: StrictBool = False


class _Sampling(_Open):
    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0, strict=True)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0, strict=True)
    seed: Optional[StrictInt] = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: Optional[Any] = None
    stream: Optional[StrictBool] = None
    stream_options: Optional[StreamOptions] = None
    n: Optional[StrictInt] = None
    ignore_eos: Optional[StrictBool] = None
    return_token_ids: Optional[StrictBool] = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
            raise ValueError(f"must be a non-empty string or a list of at most {MAX_STOP} non-empty strings")
        return tuple(stops)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
            v = v[0]
        if not isinstance(v, str):
            raise ValueError("must be a string (batched prompts are not supported)")
        if not v:
            raise ValueError("must not be empty")
        return v


# parsing --------------------------------------------------------------------------------------------
def decode_body(raw: bytes) -> dict[str, Any]:
    """The JSON object in ``raw``; RequestError for bad UTF-8/JSON, nesting too deep, or a non-object."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise RequestError("request body is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {type(body).__name__}", code="invalid_body")
    return body


def _param(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _validation_error(e: ValidationError) -> RequestError:
    err = e.errors(include_url=False)[0]
    param = _param(tuple(err["loc"]))
    if err["type"] == "missing":
        return RequestError(f"'{param}' is required", param=param)
    msg = str(err["msg"]).removeprefix("Value error, ")
    return RequestError(f"'{param}': {msg}, got {err.get('input')!r}"[:300], param=param)


def parse_request(body: dict[str, Any], kind: Kind, model_name: str, max_tokens_limit: int) -> GenRequest:
    """Validate one chat or completion request body against the served model and token limit."""
    for key in UNSUPPORTED:
        v = body.get(key)
        if v is not None and v is not False and v != 0 and v != [] and v != {}:
            raise RequestError(f"'{key}' is not supported by this server", param=key, code="unsupported_parameter")
    model_cls: type[_Sampling] = ChatRequest if kind == "chat" else CompletionRequest
    try:
        r = model_cls.model_validate(body)
    except ValidationError as e:
        raise _validation_error(e) from None
    if r.model is not None and r.model != model_name:
        raise RequestError(f"model {r.model!r} does not exist; this server serves {model_name!r}",
                           param="model", status=404, code="model_not_found")
    key, max_tokens = "max_tokens", r.max_tokens
    if isinstance(r, ChatRequest) and r.max_completion_tokens is not None:
        key, max_tokens = "max_completion_tokens", r.max_completion_tokens
    if max_tokens is not None and max_tokens > max_tokens_limit:
        raise RequestError(f"'{key}' must be between 1 and {max_tokens_limit}, got {max_tokens}", param=key)
    if r.n is not None and r.n != 1:
        raise RequestError(f"'n' must be 1 (one choice per request), got {r.n}", param="n")
    stream = bool(r.stream)
    if r.return_token_ids and stream:
        raise RequestError("'return_token_ids' is supported without streaming only", param="return_token_ids")
    messages = tuple({"role": m.role, "content": m.content} for m in r.messages) if isinstance(r, ChatRequest) else None
    return GenRequest(kind=kind, model=model_name, messages=messages,
                      prompt=r.prompt if isinstance(r, CompletionRequest) else None, max_tokens=max_tokens,
                      temperature=float(r.temperature if r.temperature is not None else 0.0),
                      top_p=float(r.top_p if r.top_p is not None else 1.0), seed=r.seed, stop=r.stop or (),
                      stream=stream, include_usage=bool(r.stream_options and r.stream_options.include_usage),
                      ignore_eos=bool(r.ignore_eos), return_token_ids=bool(r.return_token_ids))
