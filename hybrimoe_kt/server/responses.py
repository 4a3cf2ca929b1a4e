"""OpenAI-compatible response bodies (pydantic models, serialized with the fields that were set) for
chat and text completions, their stream chunks, and the model list."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Sequence

from pydantic import BaseModel

from hybrimoe_kt.server.protocol import GenRequest, Kind

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    logprobs: None = None
    finish_reason: FinishReason
    token_ids: Optional[list[int]] = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: Optional[list[int]] = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Optional[FinishReason]
    prompt_token_ids: Optional[list[int]] = None
    token_ids: Optional[list[int]] = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: Optional[FinishReason]


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hybrimoe-kt"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(kind: Kind) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def full_response(req: GenRequest, rid: str, created: int, text: str, finish: str,
                  prompt_ids: Sequence[int], token_ids: Sequence[int]) -> dict[str, Any]:
    """The whole answer; with ``return_token_ids`` also the token ids where vLLM puts them (chat: the
    prompt's on the response, completion: both on the choice)."""
    ids: dict[str, Any] = {"token_ids": list(token_ids)} if req.return_token_ids else {}
    u = usage(len(prompt_ids), len(token_ids))
    if req.kind == "chat":
        choice = ChatChoice(message=ChatMessage(content=text), finish_reason=finish, **ids)  # type: ignore[arg-type]
        extra = {"prompt_token_ids": list(prompt_ids)} if req.return_token_ids else {}
        return dump_nested(ChatCompletion(id=rid, created=created, model=req.model, choices=[choice], usage=u, **extra))
    if req.return_token_ids:
        ids["prompt_token_ids"] = list(prompt_ids)
    c = CompletionChoice(text=text, finish_reason=finish, **ids)  # type: ignore[arg-type]
    return dump_nested(Completion(id=rid, created=created, model=req.model, choices=[c], usage=u))


def stream_chunk(req: GenRequest, rid: str, created: int, text: Optional[str], finish: Optional[str],
                 first: bool = False) -> dict[str, Any]:
    """One SSE chunk: a text delta (``first`` adds the assistant role for chat) or the final finish."""
    if req.kind == "chat":
        delta = Delta(**({"role": "assistant"} if first else {}), **({"content": text} if text is not None else {}))
        choice = ChunkChoice(delta=delta, finish_reason=finish)  # type: ignore[arg-type]
        return dump_nested(ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[choice]))
    c = CompletionChoice(text=text or "", finish_reason=finish)  # type: ignore[arg-type]
    return dump_nested(Completion(id=rid, created=created, model=req.model, choices=[c]))


def usage_chunk(req: GenRequest, rid: str, created: int, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    cls = ChatCompletionChunk if req.kind == "chat" else Completion
    return dump_nested(cls(id=rid, created=created, model=req.model, choices=[],
                           usage=usage(prompt_tokens, completion_tokens)))


def dump_nested(m: BaseModel) -> dict[str, Any]:
    """``m`` as JSON without the optional extras nobody set, at every level (a delta keeps only the
    role and content it was given)."""
    return _strip(m)


def _strip(v: Any) -> Any:
    if isinstance(v, BaseModel):
        out = {}
        for name, f in type(v).model_fields.items():
            value = getattr(v, name)
            optional_unset = not f.is_required() and name not in v.model_fields_set and f.default is None
            if optional_unset and name not in ("logprobs", "finish_reason"):
                continue
            out[name] = _strip(value)
        return out
    if isinstance(v, list):
        return [_strip(x) for x in v]
    return v
