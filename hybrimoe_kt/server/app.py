"""The HTTP side of the OpenAI-compatible server: a FastAPI app over the engine.

Endpoints: POST /v1/chat/completions and /v1/completions (JSON, or Server-Sent Events ending in
``data: [DONE]`` with ``stream: true``), GET /v1/models, GET /health (the engine's real state: 503 when
the worker is dead or the server is draining), GET /metrics (Prometheus text), GET /metrics.json.
Every error is JSON ``{"error": {"message", "type", "param", "code"}}``: 400 bad request (including a
prompt longer than the context, found before the worker sees it), 401 bad API key, 404, 405, 413 body
too large, 415 not a JSON body, 429 queue full (with ``Retry-After``), 500 generation failure, 503
shutting down or too many requests in flight.

The prompt is tokenized here, on the framework's thread pool, never on the engine's worker. A client
that goes away cancels its generation, streaming or not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from hybrimoe_kt.server.engine import Engine, Job
from hybrimoe_kt.server.metrics import CONTENT_TYPE
from hybrimoe_kt.server.protocol import GenRequest, RequestError, decode_body, error_body, parse_request
from hybrimoe_kt.server.responses import (ModelCard, ModelList, dump_nested, full_response, new_id, now,
                                          stream_chunk, usage_chunk)

log = logging.getLogger(__name__)

MAX_BODY = 4 << 20
DISCONNECT_POLL_S = 0.2
RETRY_AFTER_S = 1


def max_token_chars(tokenizer: Any) -> int:
    """The most characters one token can stand for (its vocabulary's longest entry): a text of C
    characters has at least C / this many tokens."""
    try:
        vocab = tokenizer.get_vocab()
        return max(8, max((len(t) for t in vocab), default=8))
    except Exception:  # a tokenizer without a vocabulary listing: no early bound
        return 1 << 30


def create_app(engine: Engine, model_name: str, max_tokens_limit: int = 512, api_key: Optional[str] = None,
               max_body: int = MAX_BODY) -> FastAPI:
    if max_tokens_limit < 1:
        raise ValueError(f"max tokens limit must be >= 1, got {max_tokens_limit}")
    app = FastAPI(title="hybrimoe-kt", docs_url=None, redoc_url=None, openapi_url=None)
    created = now()
    chars_per_token = max_token_chars(engine.tokenizer)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        msg = (f"unknown path {request.url.path!r}" if e.status_code == 404 else
               f"method {request.method} is not allowed on {request.url.path}" if e.status_code == 405 else
               str(e.detail))
        return JSONResponse(error_body(msg, "invalid_request_error", None, codes.get(e.status_code)),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not (got.startswith("Bearer ") and secrets.compare_digest(got[7:].strip(), api_key)):
            raise RequestError("invalid or missing API key (Authorization: Bearer KEY)", status=401,
                               code="invalid_api_key", type_="authentication_error")

    @app.get("/health")
    async def health() -> JSONResponse:
        h = engine.health()
        return JSONResponse(h, status_code=200 if h["status"] == "ok" else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return dump_nested(ModelList(data=[ModelCard(id=model_name, created=created)]))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.prometheus(), media_type=CONTENT_TYPE)

    @app.get("/metrics.json")
    async def metrics_json() -> dict[str, Any]:
        return {"model": model_name, "max_tokens_limit": max_tokens_limit, **engine.metrics.snapshot()}

    async def read_json(request: Request) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise RequestError(f"request body must be JSON (Content-Type: application/json), got "
                               f"{ctype or 'no Content-Type'!r}", status=415, code="unsupported_media_type")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            raise RequestError(f"request body of {length} bytes is over the {max_body} byte limit", status=413,
                               code="body_too_large")
        raw = bytearray()
        async for chunk in request.stream():  # chunked bodies too
            raw += chunk
            if len(raw) > max_body:
                raise RequestError(f"request body is over the {max_body} byte limit", status=413,
                                   code="body_too_large")
        return decode_body(bytes(raw))

    async def prepare(request: Request, kind: str) -> tuple[GenRequest, list[int], int]:
        check_key(request)
        try:
            req = parse_request(await read_json(request), kind, model_name, max_tokens_limit)  # type: ignore[arg-type]
        except RequestError:
            engine.metrics.outcome("invalid")
            raise
        param = "messages" if kind == "chat" else "prompt"
        context = engine.max_positions
        try:
            if context and req.text_length() > context * chars_per_token:  # too long for sure: no tokenizing
                raise RequestError(f"this model's maximum context length is {context} tokens; the {param} has "
                                   f"{req.text_length()} characters, more than {context} tokens",
                                   param=param, code="context_length_exceeded")
            try:
                prompt = await run_in_threadpool(engine.encode, req)
            except Exception as e:  # a template or tokenizer error is the request's content
                raise RequestError(f"cannot tokenize the request: {e}"[:300], param=param) from None
            if not prompt:
                raise RequestError(f"the {param} encodes to no tokens", param=param)
            left = context - len(prompt) if context else max_tokens_limit
            if left < 1 or (req.max_tokens is not None and req.max_tokens > left):
                asked = f" and max_tokens is {req.max_tokens}" if req.max_tokens is not None else ""
                raise RequestError(f"this model's maximum context length is {context} tokens; the {param} has "
                                   f"{len(prompt)} tokens{asked}", param=param, code="context_length_exceeded")
        except RequestError:
            engine.metrics.outcome("invalid")
            raise
        return req, prompt, req.max_tokens if req.max_tokens is not None else min(max_tokens_limit, left)

    async def generate(request: Request, kind: str) -> Response:
        req, prompt, max_tokens = await prepare(request, kind)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple] = asyncio.Queue()
        job = Job(req, prompt, max_tokens, sink=lambda ev: None)

        def sink(ev: tuple) -> None:  # called on the engine's worker thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the event loop is gone (shutting down): nobody is listening any more
                job.cancel.set()

        job.sink = sink
        engine.submit(job)
        if req.stream:
            return StreamingResponse(_stream(job, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _collect(request, job, events)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, "completion")

    return app


async def _collect(request: Request, job: Job, events: "asyncio.Queue[tuple]") -> Response:
    while True:
        try:
            ev = await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel.set()
                log.info("client went away before its answer: cancelling its generation")
                return Response(status_code=499)
            continue
        if ev[0] == "done":
            _, finish, prompt_ids, token_ids, text = ev
            return JSONResponse(full_response(job.req, new_id(job.req.kind), now(), text, finish, prompt_ids,
                                              token_ids))
        if ev[0] == "error":
            _, message, status = ev
            return JSONResponse(error_body(message, "server_error"), status_code=status)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode("utf-8") + b"\n\n"


async def _stream(job: Job, events: "asyncio.Queue[tuple]") -> AsyncIterator[bytes]:
    req, rid, created = job.req, new_id(job.req.kind), now()
    ended = False
    try:
        if req.kind == "chat":
            yield _sse(stream_chunk(req, rid, created, "", None, first=True))
        while True:
            ev = await events.get()
            if ev[0] == "delta":
                yield _sse(stream_chunk(req, rid, created, ev[1], None))
            elif ev[0] == "done":
                yield _sse(stream_chunk(req, rid, created, None, ev[1]))
                if req.include_usage:
                    yield _sse(usage_chunk(req, rid, created, len(ev[2]), len(ev[3])))
                break
            else:
                yield _sse(error_body(ev[1], "server_error"))
                break
        ended = True
        yield b"data: [DONE]\n\n"
    finally:
        if not ended:  # the client went away (the framework cancelled this stream)
            job.cancel.set()
            log.info("client disconnected mid-stream: cancelling its generation")
