"""The gRPC server: inference, admin, health and reflection on one port (grpc.aio).

Security is decided at start, before the port is bound: TLS (``--tls-cert``/``--tls-key``, and with
``--tls-client-ca`` client certificates too) and the API keys (``ServerKeys`` in auth.py: on with any
key in the file; without keys only on loopback or with ``--insecure-no-auth``). What must not start
raises ``StartupError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lorafleet_proto.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)
from lorafleet_server.app import Service
from lorafleet_server.config import ServerConfig, keys_pepper
from lorafleet_server.edge.observe import CallObserver
from lorafleet_server.engine.admin import AdapterAdmin
from lorafleet_server.errors import StartupError
from lorafleet_server.grpc.admin import AdaptersServicer
from lorafleet_server.grpc.auth import ADMIN_RPCS, AuthInterceptor, ServerKeys, is_loopback
from lorafleet_server.grpc.inference import InferenceServicer
from lorafleet_server.grpc.rpc import DecodeGuard, rpc_names
from lorafleet_server.grpc.usage import UsageServicer
from lorafleet_server.listen import check_can_listen
from lorafleet_server.metrics import Metrics, MetricsServer, serve_metrics
from lorafleet_server.tenants.keys import PepperSource

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    adapters_pb2.DESCRIPTOR.services_by_name["AdaptersService"].full_name,
    usage_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name,
)


def _read_pem(path: Path, flag: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StartupError(f"{flag} {path}: cannot read it: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise StartupError(f"{flag} {path}: not a PEM file (no '-----BEGIN' line)")
    return data


def _no_password() -> bytes:
    return b""  # an encrypted key fails to load instead of prompting on the terminal


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from ``--tls-cert``/``--tls-key`` (and ``--tls-client-ca``: client certificates
    required), or None for plaintext. The files are read and checked here, with Python's ssl module,
    that the key belongs to the certificate and the CA file parses: gRPC would only fail at the first
    handshake. Raises StartupError naming the flag and the file."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    cert = _read_pem(config.tls_cert, "--tls-cert")
    key = _read_pem(config.tls_key, "--tls-key")
    client_ca = _read_pem(config.tls_client_ca, "--tls-client-ca") if config.tls_client_ca is not None else None
    check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        check.load_cert_chain(config.tls_cert, config.tls_key, password=_no_password)
    except (ssl.SSLError, OSError) as exc:
        raise StartupError(
            f"--tls-cert {config.tls_cert} / --tls-key {config.tls_key}: not a usable certificate and "
            f"matching unencrypted private key ({exc})"
        ) from None
    if client_ca is not None:
        try:
            check.load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise StartupError(f"--tls-client-ca {config.tls_client_ca}: no usable CA certificate ({exc})") from None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def server_keys(config: ServerConfig, on_reload: Callable[[bool], None] | None = None) -> ServerKeys:
    """The API keys of ``config``: its keys file and pepper; open without keys only on loopback or with
    ``--insecure-no-auth``."""
    return ServerKeys(
        config.keys_path,
        PepperSource(config.keys_path, keys_pepper()),
        host=config.host,
        allow_open=is_loopback(config.host) or config.insecure_no_auth,
        on_reload=on_reload,
    )


def check_startup(config: ServerConfig) -> None:
    """The start rules (TLS files, keys file, no keys off loopback, ports free), checked before the model
    loads so a server that must not start says so at once; ``GrpcServer.start`` applies them again for real."""
    server_credentials(config)
    server_keys(config).load()
    check_can_listen(config.host, config.port, "--port")
    check_can_listen(config.metrics_address_host, config.metrics_port, "--metrics-port")
    check_can_listen(config.host, config.http_port, "--http-port")


ENGINE_WATCH_SECONDS = 1.0  # how often health checks that the engine still takes requests
CUT_MARGIN_SECONDS = 2.0  # gRPC's stop grace beyond the engine's, so the engine's cut ends the calls


def open_metrics(config: ServerConfig, metrics: Metrics) -> MetricsServer:
    """Serve ``metrics`` on ``--metrics-host``:``--metrics-port``, or StartupError. ``lorafleet serve``
    opens it before the model loads: Prometheus's ``up`` then means "the process answers", not "the
    model has loaded" (a load of over a minute paged LorafleetDown), and ``lorafleet_ready`` says
    whether it serves."""
    try:
        return serve_metrics(metrics.registry, config.metrics_address_host, config.metrics_port)
    except OSError as exc:
        where = f"{config.metrics_address_host}:{config.metrics_port}"
        raise StartupError(f"--metrics-port {config.metrics_port}: cannot listen on {where} ({exc.strerror})") from None


class GrpcServer:
    """Owns the aio server of one Service; call from inside an event loop. It serves the service's
    metrics on ``metrics_server`` when given (already open), else opens the port itself in ``start``;
    either way it closes it in ``stop``."""

    def __init__(self, service: Service, metrics_server: MetricsServer | None = None) -> None:
        self.service = service
        cfg = service.config
        calls = CallObserver(service.metrics, ADMIN_RPCS, cfg.replica_name)
        self.keys = server_keys(cfg, service.metrics.keys_reloaded)
        self._server = grpc.aio.server(
            # The first interceptor runs outermost: authenticate before the request bytes are parsed.
            interceptors=[AuthInterceptor(self.keys, calls, SERVICE_NAMES), DecodeGuard(calls, SERVICE_NAMES)],
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        inference = InferenceServicer(
            service.engine, service.info, cfg.default_max_new_tokens, calls, service.slot_memory_bytes
        )
        admin = AdaptersServicer(AdapterAdmin(service.engine), calls)
        usage = UsageServicer(service.engine.usage, calls)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(inference, self._server)
        adapters_pb2_grpc.add_AdaptersServiceServicer_to_server(admin, self._server)
        usage_pb2_grpc.add_UsageServiceServicer_to_server(usage, self._server)
        service.metrics.declare_rpcs(name for servicer in (inference, admin, usage) for name in rpc_names(servicer))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self.port = 0
        self.metrics_server = metrics_server
        self._forced = asyncio.Event()
        self._force_stop: asyncio.Future[None] | None = None
        self._stopping = False
        self._engine_failed = False
        self._engine_watch: asyncio.Future[None] | None = None

    @property
    def stopping(self) -> bool:
        """A stop has begun, or the engine stopped taking requests (health NOT_SERVING)."""
        return self._stopping or self._engine_failed

    @property
    def metrics_url(self) -> str:
        port = self.metrics_server.port if self.metrics_server is not None else 0
        return f"http://{self.service.config.metrics_address_host}:{port}/metrics"

    @property
    def security(self) -> str:
        """How calls are protected, for the ready line."""
        cfg = self.service.config
        tls = "plaintext" if cfg.tls_cert is None else "TLS" if cfg.tls_client_ca is None else "mTLS"
        return f"{tls}, API keys {'on' if self.keys.enforcing else 'OFF'}"

    async def start(self, ready: bool = True) -> int:
        """Check TLS files and keys (StartupError), then bind, start the engine and serve. ``ready``:
        set ``lorafleet_ready`` now (else the caller does, once its other edges serve too)."""
        cfg = self.service.config
        credentials = server_credentials(cfg)
        self.keys.start(cfg.keys_poll_seconds)
        try:
            address = f"{cfg.host}:{cfg.port}"
            try:  # grpcio raises RuntimeError("Failed to bind ...") where older versions returned 0
                if credentials is None:
                    self.port = self._server.add_insecure_port(address)
                else:
                    self.port = self._server.add_secure_port(address, credentials)
            except RuntimeError:
                self.port = 0
            if self.port == 0:
                raise StartupError(f"--port {cfg.port}: cannot listen on {cfg.address} (in use?)")
            if self.metrics_server is None:
                self.metrics_server = open_metrics(cfg, self.service.metrics)
        except BaseException:
            self.keys.stop()
            raise
        self.service.engine.start()
        await self._server.start()
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if ready:
            self.service.metrics.ready.set(1)
        self._engine_watch = asyncio.ensure_future(self._watch_engine())
        return self.port

    async def _watch_engine(self, interval: float = ENGINE_WATCH_SECONDS) -> None:
        """Health follows the engine: if its loop ends while the server is not stopping (a bug crashed
        it: it refuses every request from then on), turn NOT_SERVING, so probes and Envoy take this
        replica out and an orchestrator restarts it, instead of sending it traffic it cannot serve."""
        while not self._stopping:
            await asyncio.sleep(interval)
            if not self._stopping and not self.service.engine.accepting:
                log.error("the engine stopped taking requests (see the crash above): health NOT_SERVING")
                self._engine_failed = True
                self.service.metrics.ready.set(0)
                for name in ("", *SERVICE_NAMES):
                    await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
                return

    async def stop(self, drain_seconds: float = 0.0) -> None:
        """Drain, then stop. Health turns NOT_SERVING at once while new requests are still served for
        ``drain_seconds`` (load balancers see it and move away); then new calls get UNAVAILABLE (one that
        arrives just as gRPC's own stop begins may be refused by gRPC instead: a refused stream, which
        Envoy retries, or CANCELLED), queued requests fail with UNAVAILABLE at once, running ones
        finish within the shutdown grace and the rest are cut. ``force()`` (a second signal) cuts short
        whatever phase is running."""
        grace = self.service.config.shutdown_grace_seconds
        self._stopping = True
        if self._engine_watch is not None:
            self._engine_watch.cancel()
        await self._health.enter_graceful_shutdown()
        self.service.metrics.ready.set(0)
        self.service.metrics.draining.set(1)
        if drain_seconds > 0:
            log.info("draining: health NOT_SERVING; still serving new requests for %.1fs", drain_seconds)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._forced.wait(), drain_seconds)
        running, queued = self.service.engine.load_stats()
        log.info(
            "refusing new requests; %d running may finish within %.1fs, %d queued get UNAVAILABLE",
            running,
            grace,
            queued,
        )
        # gRPC's grace outlasts the engine's by CUT_MARGIN_SECONDS: the engine cuts what still runs and
        # each call ends with its UNAVAILABLE ("stopped by the server": not metered, retried elsewhere).
        # With equal graces gRPC often cancelled the calls first, so a cut call was taken for a client's
        # cancel and metered, and Envoy ran it again on another replica: billed twice (an outside review).
        stop = asyncio.ensure_future(self._server.stop(None if self._forced.is_set() else grace + CUT_MARGIN_SECONDS))
        # On a thread of its own: the loop's shared pool may be held by calls waiting on the store.
        with ThreadPoolExecutor(1, thread_name_prefix="engine-shutdown") as pool:
            await asyncio.get_running_loop().run_in_executor(
                pool, self.service.engine.shutdown, 0.0 if self._forced.is_set() else grace
            )
        await stop
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.keys.stop()
        log.info("stopped")

    def force(self) -> None:
        """Stop now: end the drain wait, cut running requests, close every call."""
        self._forced.set()
        self.service.engine.abort()
        self._force_stop = asyncio.ensure_future(self._server.stop(None))


class Edge(Protocol):
    """Another front end on the same engine (the OpenAI-compatible HTTP API), started after the gRPC
    server and stopped with it: ``drain`` when the drain starts (its health turns NOT_SERVING), ``stop``
    once the engine has finished or cut every request."""

    async def start(self) -> str: ...  # what the ready line says of it

    def drain(self) -> None: ...

    async def stop(self) -> None: ...


async def serve_forever(
    service: Service,
    edges: Callable[[ServerKeys], Sequence[Edge]] | None = None,
    metrics_server: MetricsServer | None = None,
) -> None:
    """Serve until SIGTERM (drain, then stop) or SIGINT (stop without the drain wait); a second signal
    of either kind stops now. The handlers are in place before the ready line, so an orchestrator that
    signals as soon as it sees it still gets a drain. ``edges`` makes the other front ends, given the
    gRPC server's API keys (one watcher for all). ``metrics_server``: the metrics port, if already open."""
    server = GrpcServer(service, metrics_server)
    others = list(edges(server.keys)) if edges is not None else []
    stopping = asyncio.Event()
    drain = {signal.SIGTERM: service.config.drain_seconds, signal.SIGINT: 0.0}
    received: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        if len(received) == 1:
            stopping.set()
        else:
            log.warning("%s again: stopping now", sig.name)
            server.force()

    loop = asyncio.get_running_loop()
    for sig in drain:
        loop.add_signal_handler(sig, on_signal, sig)
    port = await server.start(ready=False)
    described = []
    try:
        for edge in others:
            described.append(await edge.start())
    except BaseException:
        await server.stop()
        raise
    if not server.stopping and service.engine.accepting:  # every edge serves (and nothing stopped meanwhile)
        service.metrics.ready.set(1)
    log.info(
        "lorafleet ready: gRPC on %s:%d, %smetrics on %s (model %s, %s, %s; %s)",
        service.config.host,
        port,
        "".join(f"{d}, " for d in described),
        server.metrics_url,
        service.info.model_id,
        service.info.quantization,
        service.info.device,
        server.security,
    )
    await stopping.wait()
    log.info(
        "%s: shutting down (drain %.1fs, grace %.1fs)",
        received[0].name,
        drain[received[0]],
        service.config.shutdown_grace_seconds,
    )
    for edge in others:
        edge.drain()
    await server.stop(drain[received[0]])
    for edge in others:
        await edge.stop()


class BackgroundServer:
    """Runs a GrpcServer on its own event loop thread (tests, benchmarks, embedding in a process)."""

    def __init__(self, service: Service) -> None:
        self._service = service
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-loop", daemon=True)
        self._server: GrpcServer | None = None
        self.port = 0

    @property
    def metrics_port(self) -> int:
        assert self._server is not None and self._server.metrics_server is not None
        return self._server.metrics_server.port

    def start(self) -> int:
        """Start serving; a server that must not start (StartupError) leaves no loop thread behind."""
        self._thread.start()
        future: Future[int] = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        try:
            self.port = future.result(timeout=60)
        except BaseException:
            self._server = None
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            raise
        return self.port

    async def _start(self) -> int:
        self._server = GrpcServer(self._service)
        return await self._server.start()

    def stop(self, drain_seconds: float = 0.0) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(drain_seconds), self._loop).result(timeout=120)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
