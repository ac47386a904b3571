"""Serving the HTTP app with uvicorn inside the server's own event loop (the gRPC server's), or on a
thread of its own (``BackgroundHttpServer``: tests and benchmarks).

uvicorn's ``Server.serve`` would install its own SIGINT/SIGTERM handlers over ours, so ``HttpServer``
drives its public steps itself: ``startup`` on a socket bound here, the ``main_loop`` ticker as a task,
``shutdown`` when asked. The signals stay with ``serve_forever`` (grpc/server.py), which drains both edges.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from concurrent.futures import Future

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from lorafleet_server.app import Service
from lorafleet_server.edge.observe import CallObserver
from lorafleet_server.errors import StartupError
from lorafleet_server.http.app import Health, HttpTimeouts, create_app
from lorafleet_server.http.routes import ROUTE_NAMES
from lorafleet_server.tenants.access import KeyChecker

log = logging.getLogger(__name__)

SHUTDOWN_SECONDS = 5  # for uvicorn to close connections once the engine has finished every request


class HeadDeadline(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's head (request line and headers):
    ``head_seconds`` from the connection's start, or from the end of the previous response on a
    kept-alive connection, whatever arrives meanwhile. uvicorn has none (its keep-alive timer stops at
    the first byte), so a client sending half a head, or a byte now and then, held its connection, and
    a file descriptor of the process that serves gRPC too, for good. The body's own deadline is
    ``BodyLimit``'s. Subclassed per server with its ``head_seconds`` (``with_deadline``)."""

    head_seconds = 30.0

    @classmethod
    def with_deadline(cls, seconds: float) -> type[HeadDeadline]:
        return type("HeadDeadline", (cls,), {"head_seconds": seconds})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_of: object = None  # the cycle that was current when the timer started
        super().connection_made(transport)
        self._start_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_timer is not None and self.cycle is not self._head_of:  # a new request's head is in
            self._stop_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _start_head_timer(self) -> None:
        self._stop_head_timer()
        if self.cycle is not None and not self.cycle.response_complete:  # a pipelined head already came
            return
        self._head_of = self.cycle
        self._head_timer = self.loop.call_later(self.head_seconds, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            log.info("HTTP connection from %s closed: no complete request head in %gs", self.client, self.head_seconds)
            self.transport.close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class HttpServer:
    """The OpenAI-compatible API of ``service`` on ``host:port`` (0: any free port), checking ``keys``
    (the ``ServerKeys`` the gRPC edge keeps current)."""

    def __init__(
        self, service: Service, keys: KeyChecker, host: str, port: int, timeouts: HttpTimeouts | None = None
    ) -> None:
        timeouts = timeouts or HttpTimeouts()
        self.health = Health()
        calls = CallObserver(service.metrics)
        service.metrics.declare_rpcs(ROUTE_NAMES)
        cfg = service.config
        app = create_app(
            service.engine,
            service.info,
            keys,
            calls,
            cfg.default_max_new_tokens,
            cfg.max_message_bytes,
            self.health,
            replica_id=cfg.replica_name,
            body_seconds=timeouts.body_seconds,
        )
        self._config = uvicorn.Config(
            app,
            host=host,
            port=port,
            http=HeadDeadline.with_deadline(timeouts.head_seconds),
            lifespan="off",
            log_config=None,  # our logging setup (logs.py) stays in charge
            access_log=False,  # CallObserver writes one line per request
            server_header=False,
            timeout_graceful_shutdown=SHUTDOWN_SECONDS,
            timeout_keep_alive=30,
            # The gRPC port's TLS, and its client-certificate check (mTLS), on this port too: a
            # plaintext HTTP API beside it carried the same API keys in clear, past the mTLS check.
            ssl_certfile=None if cfg.tls_cert is None else str(cfg.tls_cert),
            ssl_keyfile=None if cfg.tls_key is None else str(cfg.tls_key),
            ssl_ca_certs=None if cfg.tls_client_ca is None else str(cfg.tls_client_ca),
            ssl_cert_reqs=ssl.CERT_NONE if cfg.tls_client_ca is None else ssl.CERT_REQUIRED,
        )
        self._scheme = "http" if cfg.tls_cert is None else "https"
        self._server = uvicorn.Server(self._config)
        self._socket: socket.socket | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"{self._scheme}://{_url_host(self._config.host)}:{self.port}"

    async def start(self) -> str:
        """Bind and serve; returns what the ready line says of it. StartupError when it cannot listen."""
        try:
            sock = self._config.bind_socket()
        except SystemExit:  # uvicorn logs the OSError and exits; say it our way
            raise StartupError(
                f"--http-port {self._config.port}: cannot listen on {self._config.host}:{self._config.port} "
                "(in use? pass another --http-port, or 0 to turn the HTTP API off)"
            ) from None
        self._socket = sock
        self.port = int(sock.getsockname()[1])
        self._config.load()
        self._server.lifespan = self._config.lifespan_class(self._config)
        await self._server.startup(sockets=[sock])
        self._ticker = asyncio.ensure_future(self._server.main_loop())  # Date header, exit flag
        return f"OpenAI-compatible HTTP on {self.url}"

    def drain(self) -> None:
        """A drain starts: /health answers 503 while requests are still served (load balancers move away)."""
        self.health.serving = False

    async def stop(self) -> None:
        """Close the listener and the connections; call after the engine has finished (or cut) its requests."""
        self.health.serving = False
        if self._ticker is None:
            return
        self._server.should_exit = True
        await self._ticker
        await self._server.shutdown(sockets=[self._socket] if self._socket is not None else None)
        self._ticker = None


class BackgroundHttpServer:
    """An ``HttpServer`` on its own event loop thread, next to a gRPC server of the same service."""

    def __init__(
        self,
        service: Service,
        keys: KeyChecker,
        host: str = "127.0.0.1",
        port: int = 0,
        timeouts: HttpTimeouts | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="http-loop", daemon=True)
        self.server = HttpServer(service, keys, host, port, timeouts)

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> int:
        self._thread.start()
        future: Future[str] = asyncio.run_coroutine_threadsafe(self.server.start(), self._loop)
        try:
            future.result(timeout=60)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            raise
        return self.server.port

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
