"""The server process: the engine and the FastAPI app on uvicorn (HTTP/1.1, keep-alive).

- Socket: bound before anything else starts (``port=0`` picks a free one: see ``.port``).
- Idle and slow sockets: a connection must complete its first request's headers within
  ``idle_timeout_s`` of connecting, and an idle keep-alive connection is closed after it.
- Bounded concurrency: at most ``max_in_flight`` HTTP requests at once; more get a JSON 503.
- SIGTERM / SIGINT (when run in the main thread): stop accepting connections, let the engine finish
  the accepted requests within ``grace_s`` seconds, then end the rest (a stream's last chunk has
  finish_reason ``length``, then ``[DONE]``), close, and return normally (exit status 0). A second
  SIGINT exits at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import threading
from types import FrameType
from typing import Any, Optional

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from hybrimoe_kt.server.app import create_app
from hybrimoe_kt.server.engine import Engine
from hybrimoe_kt.server.protocol import error_body

log = logging.getLogger(__name__)


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, with the keep-alive timeout also applied from the moment a connection is
    made until its first request's headers are complete (uvicorn starts it only after a response)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline = self.loop.time() + self.timeout_keep_alive
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is None and not self.transport.is_closing():  # headers still incomplete
            self._unset_keepalive_if_required()
            left = max(0.0, self._deadline - self.loop.time())
            self.timeout_keep_alive_task = self.loop.call_later(left, self.timeout_keep_alive_handler)


class InFlightLimit:
    """ASGI middleware: at most ``limit`` HTTP requests in flight; the next ones get a JSON 503."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit, self.active = app, limit, 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            body = json.dumps(error_body(f"too many requests in flight ({self.limit}); retry later", "server_busy",
                                         None, "too_many_connections")).encode()
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class _Uvicorn(uvicorn.Server):
    """Shutdown on a signal drains the engine first, and does not re-raise the signal afterwards."""

    def __init__(self, config: uvicorn.Config, engine: Engine, grace_s: float) -> None:
        super().__init__(config)
        self.engine, self.grace_s = engine, grace_s

    def handle_exit(self, sig: int, frame: Optional[FrameType]) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
            return
        log.info("signal %d: draining (grace %.0f s)", sig, self.grace_s)
        self.engine.drain(self.grace_s)
        self.should_exit = True


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; ValueError with the reason when it cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} does not resolve: {e}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


class Server:
    """An engine behind an HTTP listener."""

    def __init__(self, engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 10002,
                 max_tokens_limit: int = 512, api_key: Optional[str] = None, grace_s: float = 30.0,
                 idle_timeout_s: float = 15.0, max_in_flight: int = 256, sock: Optional[socket.socket] = None) -> None:
        self.engine = engine
        self.model_name = model_name
        self.sock = sock if sock is not None else bind(host, port)
        self.app = create_app(engine, model_name, max_tokens_limit, api_key)
        config = uvicorn.Config(InFlightLimit(self.app, max_in_flight), http=HeaderDeadlineProtocol,  # type: ignore[arg-type]
                                lifespan="off", log_level="warning", access_log=False,
                                timeout_keep_alive=int(max(1, idle_timeout_s)),
                                timeout_graceful_shutdown=int(grace_s) + 5)
        self.uvicorn = _Uvicorn(config, engine, grace_s)
        self._thread: Optional[threading.Thread] = None

    @property
    def host(self) -> str:
        return str(self.sock.getsockname()[0])

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def serve_forever(self) -> None:
        """Run until a signal (main thread) or ``shutdown``; stops the engine on the way out."""
        self.engine.start()
        log.info("serving %s on http://%s:%d", self.model_name, self.host, self.port)
        try:
            self.uvicorn.run(sockets=[self.sock])
        finally:
            self.engine.stop()
            self.sock.close()

    def start_background(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.serve_forever, name="hybrimoe-http", daemon=True)
        self._thread.start()
        while not self.uvicorn.started and self._thread.is_alive():
            threading.Event().wait(0.01)
        return self._thread

    def drain(self) -> None:
        """What a SIGTERM does, for a server running in the background."""
        self.uvicorn.handle_exit(signal.SIGTERM, None)

    def shutdown(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
