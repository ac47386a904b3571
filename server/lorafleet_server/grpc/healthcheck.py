"""A container health probe: ``python -m lorafleet_server.grpc.healthcheck`` exits 0 when the local
server's gRPC health service answers SERVING, 1 otherwise (the Dockerfile's HEALTHCHECK).

It reads the server's own settings (flags are not needed: ``LORAFLEET_*`` environment and the
``--config`` file, as ``lorafleet serve`` does) for the port, and asks 127.0.0.1 (the server's
``--host`` when that is a specific address). Health needs no API key (auth.py leaves it open). With
TLS the probe trusts the certificates of ``--tls-cert`` (a self-signed certificate, or a chain that
ends with its CA) and, like gRPC, checks the name ``localhost``; where the certificate names no such
host, use the orchestrator's gRPC probe instead (Kubernetes: deploy/kubernetes/lorafleet.yaml). With
mutual TLS (``--tls-client-ca``) it presents the server's own certificate and key as its client
certificate, which the server accepts where that CA also issued the server's certificate (one
internal CA for both) and the certificate may serve as a client's (an extendedKeyUsage with
clientAuth, or none: many CA templates issue serverAuth only); elsewhere the handshake fails, and the
orchestrator's probe is the one to use.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lorafleet_server.config import ServerConfig, parse_config

WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def probe_target(config: ServerConfig) -> str:
    host = "127.0.0.1" if config.host in WILDCARD_HOSTS else config.host
    return f"[{host}]:{config.port}" if ":" in host else f"{host}:{config.port}"


def check(config: ServerConfig, timeout: float = 3.0) -> tuple[bool, str]:
    """(serving, what was seen) for the server ``config`` describes."""
    target = probe_target(config)
    if config.tls_cert is None:
        channel = grpc.insecure_channel(target)
    else:
        roots = config.tls_cert.read_bytes()
        options = [("grpc.ssl_target_name_override", "localhost")]
        identity: dict[str, bytes] = {}
        if config.tls_client_ca is not None and config.tls_key is not None:  # mTLS: a client certificate
            identity = {"private_key": config.tls_key.read_bytes(), "certificate_chain": roots}
        credentials = grpc.ssl_channel_credentials(root_certificates=roots, **identity)
        channel = grpc.secure_channel(target, credentials, options)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as error:
            return False, f"{target}: {error.code().name}: {error.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{target}: {status}"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = parse_config(list(argv) if argv is not None else sys.argv[1:])
        serving, seen = check(config)
    except (OSError, ValueError) as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 1
    print(seen)
    return 0 if serving else 1


if __name__ == "__main__":
    raise SystemExit(main())
