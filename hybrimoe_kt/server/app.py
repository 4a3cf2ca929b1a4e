"""The HTTP side of the OpenAI-compatible server (standard library ``ThreadingHTTPServer``).

Endpoints: POST /v1/chat/completions, POST /v1/completions (JSON or, with ``stream: true``, Server-Sent
Events ending in ``data: [DONE]``), GET /v1/models, GET /health, GET /metrics. Errors are JSON
``{"error": {...}}``: 400 bad request, 404 unknown path, 405 wrong method, 413 body too large, 429 queue
full, 500 generation failure. Each connection thread only parses, queues and relays; the engine's
single worker runs the model. A streaming client that goes away cancels its generation.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from hybrimoe_kt.server.engine import Engine, Job
from hybrimoe_kt.server.protocol import (RequestError, decode_body, error_body, full_response, new_id, now,
                                         parse_request, stream_chunk, usage_chunk)

log = logging.getLogger(__name__)

MAX_BODY = 4 << 20
GET_PATHS = ("/health", "/v1/models", "/metrics")
POST_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
DISCONNECTS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # listen backlog: bursts of clients connect before threads accept them


class Server:
    """An engine behind an HTTP listener. ``port=0`` picks a free port (see ``.port``)."""

    def __init__(self, engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 10002,
                 max_tokens_limit: int = 512) -> None:
        if max_tokens_limit < 1:
            raise ValueError(f"max tokens limit must be >= 1, got {max_tokens_limit}")
        self.engine = engine
        self.model_name = model_name
        self.max_tokens_limit = max_tokens_limit
        self.started = time.time()
        self.httpd = _HTTPServer((host, port), _Handler)
        self.httpd.app = self  # type: ignore[attr-defined]
        self._thread: Optional[threading.Thread] = None

    @property
    def host(self) -> str:
        return str(self.httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def serve_forever(self) -> None:
        self.engine.start()
        log.info("serving %s on http://%s:%d", self.model_name, self.host, self.port)
        try:
            self.httpd.serve_forever(poll_interval=0.2)
        finally:
            self.engine.stop()
            self.httpd.server_close()

    def start_background(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.serve_forever, name="hybrimoe-http", daemon=True)
        self._thread.start()
        return self._thread

    def shutdown(self) -> None:
        self.httpd.shutdown()
        if self._thread is not None:
            self._thread.join(15)

    def metrics(self) -> dict[str, Any]:
        out = {"model": self.model_name, "uptime_s": round(time.time() - self.started, 3),
               "max_tokens_limit": self.max_tokens_limit}
        out.update(self.engine.snapshot())
        return out


class _Handler(BaseHTTPRequestHandler):
    server_version = "hybrimoe-kt"
    error_content_type = "application/json"

    @property
    def app(self) -> Server:
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # plumbing --------------------------------------------------------------------------------------
    def _send_json(self, status: int, obj: Any, headers: Optional[dict[str, str]] = None) -> None:
        data = json.dumps(obj).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except DISCONNECTS:
            log.info("client %s went away before its response", self.address_string())

    def _error(self, err: RequestError) -> None:
        self._send_json(err.status, err.body())

    def _path(self) -> str:
        return self.path.split("?", 1)[0]

    def _wrong_method(self, allowed: str) -> None:
        self._send_json(405, error_body(f"method {self.command} is not allowed on {self._path()}; use {allowed}",
                                        "invalid_request_error", None, "method_not_allowed"), {"Allow": allowed})

    def _not_found(self) -> None:
        self._send_json(404, error_body(f"unknown path {self._path()!r}", "invalid_request_error", None,
                                        "not_found"))

    def _route_other(self) -> None:
        path = self._path()
        if path in GET_PATHS:
            self._wrong_method("GET")
        elif path in POST_PATHS:
            self._wrong_method("POST")
        else:
            self._not_found()

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _route_other

    # GET -------------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        path = self._path()
        if path == "/health":
            self._send_json(200, {"status": "ok"})
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [
                {"id": self.app.model_name, "object": "model", "created": int(self.app.started),
                 "owned_by": "hybrimoe-kt"}]})
        elif path == "/metrics":
            self._send_json(200, self.app.metrics())
        else:
            self._route_other()

    # POST ------------------------------------------------------------------------------------------
    def do_POST(self) -> None:
        kind = POST_PATHS.get(self._path())
        if kind is None:
            self._route_other()
            return
        app = self.app
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise RequestError(f"request body of {length} bytes is over the {MAX_BODY} byte limit",
                                   status=413, code="body_too_large")
            body = decode_body(self.rfile.read(length) if length > 0 else b"")
            req = parse_request(body, kind, app.model_name, app.max_tokens_limit)  # type: ignore[arg-type]
        except RequestError as e:
            app.engine.metrics.add("invalid")
            self._error(e)
            return
        except ValueError:
            app.engine.metrics.add("invalid")
            self._error(RequestError(f"bad Content-Length header {self.headers.get('Content-Length')!r}"))
            return
        try:
            job = app.engine.submit(req)
        except RequestError as e:
            log.warning("rejected a request: queue full (%d)", app.engine.queue_size)
            self._error(e)
            return
        first = job.events.get()
        if first[0] == "reject":
            self._error(first[1])
            return
        if first[0] == "error":
            self._send_json(500, error_body(first[1], "server_error"))
            return
        if req.stream:
            self._stream(job)
        else:
            self._collect(job)

    def _collect(self, job: Job) -> None:
        parts: list[str] = []
        while True:
            ev = job.events.get()
            if ev[0] == "delta":
                parts.append(ev[1])
            elif ev[0] == "done":
                _, finish, prompt_ids, token_ids = ev
                self._send_json(200, full_response(job.req, new_id(job.req.kind), now(), "".join(parts), finish,
                                                   prompt_ids, token_ids))
                return
            else:
                self._send_json(500, error_body(ev[1], "server_error"))
                return

    def _stream(self, job: Job) -> None:
        req, rid, created = job.req, new_id(job.req.kind), now()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            if req.kind == "chat":
                self._event(stream_chunk(req, rid, created, "", None, first=True))
            while True:
                ev = job.events.get()
                if ev[0] == "delta":
                    self._event(stream_chunk(req, rid, created, ev[1], None))
                elif ev[0] == "done":
                    self._event(stream_chunk(req, rid, created, None, ev[1]))
                    if req.include_usage:
                        self._event(usage_chunk(req, rid, created, len(ev[2]), len(ev[3])))
                    break
                else:
                    self._event(error_body(ev[1], "server_error"))
                    break
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except DISCONNECTS as e:
            job.cancel.set()
            log.info("client %s disconnected mid-stream (%s): cancelling its generation",
                     self.address_string(), type(e).__name__)
        self.close_connection = True

    def _event(self, obj: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode("utf-8") + b"\n\n")
        self.wfile.flush()
