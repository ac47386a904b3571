"""Channel options, credentials and per-call metadata shared by the sync and async clients."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any, TypeAlias

import grpc

from lorafleet.errors import REPLICA_HEADER, REQUEST_ID_HEADER, header_of

# The request ids a server keeps (its own rule, server/lorafleet_server/grpc/rpc.py).
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
LIST_PAGE_SIZE = 100  # adapters per ListAdapters call (each carries every version's manifest)
API_KEY_ENV = "LORAFLEET_API_KEY"
# Affinity (docs/fleet.md): a proxy routes on the adapter header; the answering replica names itself.
ADAPTER_HEADER = "x-lorafleet-adapter"

Metadata = tuple[tuple[str, str], ...]
TlsOption: TypeAlias = bool | grpc.ChannelCredentials | None


def resolve_api_key(api_key: str | None) -> str | None:
    """The key to send: ``api_key`` when given ("" sends none), else ``$LORAFLEET_API_KEY`` if set.
    Surrounding whitespace is dropped (a key read from a file keeps its newline); a key gRPC cannot
    carry is a ValueError here, not an INTERNAL "Invalid metadata" on every call."""
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV)
    api_key = (api_key or "").strip()
    if api_key and not _metadata_safe(api_key):
        raise ValueError("api_key must be printable ASCII (it is sent as gRPC metadata)")
    return api_key or None


def channel_credentials(
    tls: TlsOption,
    root_certificates: bytes | None = None,
    client_certificate: bytes | None = None,
    client_key: bytes | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials for the channel, or None for plaintext.

    TLS is on when ``tls`` is True or ready credentials, or when any certificate is given.
    ``root_certificates``: PEM of the CA that signed the server's certificate (default: the system's
    roots). ``client_certificate`` and ``client_key``: PEM of this client's certificate and key, for a
    server that requires client certificates (mTLS); give both or neither.
    """
    pems = (root_certificates, client_certificate, client_key)
    if isinstance(tls, grpc.ChannelCredentials):
        if any(p is not None for p in pems):
            raise ValueError("give either ready TLS credentials or certificates, not both")
        return tls
    if (client_certificate is None) != (client_key is None):
        raise ValueError("client_certificate and client_key go together: give both (mTLS) or neither")
    if not tls and all(p is None for p in pems):
        return None
    for name, pem in zip(("root_certificates", "client_certificate", "client_key"), pems, strict=True):
        if pem is not None and b"-----BEGIN " not in pem:  # gRPC only fails the handshake, on every call
            raise ValueError(f"{name} is not PEM (no -----BEGIN line): give the file's contents, not its path")
    return grpc.ssl_channel_credentials(
        root_certificates=root_certificates, private_key=client_key, certificate_chain=client_certificate
    )


def channel_options(max_message_bytes: int, extra: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """The channel's arguments: the message size limits, then the caller's own (keepalive, a TLS target
    name override, a load-balancing policy, ...), which win where they name the same option."""
    extra = list(extra)
    if any(not (isinstance(o, tuple) and len(o) == 2 and isinstance(o[0], str)) for o in extra):
        raise ValueError("options must be (name, value) pairs of gRPC channel arguments")
    named = {name for name, _ in extra}
    sizes = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    return [o for o in sizes if o[0] not in named] + extra


def call_metadata(api_key: str | None, request_id: str | None, adapter: str = "") -> Metadata:
    """The metadata of one call: the bearer key, the request id and the adapter reference of the request
    body (``x-lorafleet-adapter``, what a proxy routes on), each when given."""
    metadata: list[tuple[str, str]] = []
    if api_key is not None:
        metadata.append(("authorization", f"Bearer {api_key}"))
    if request_id is not None:
        if not REQUEST_ID_PATTERN.fullmatch(request_id):
            # The server keeps only such ids and replaced any other with a random one in silence, so a
            # caller's logs and bills no longer matched the server's (an outside review).
            raise ValueError(
                "request_id must be 1-128 characters of letters, digits, '.', '_', ':' or '-' (the server "
                f"replaces any other id with its own), got {request_id[:80]!r}"
            )
        metadata.append((REQUEST_ID_HEADER, request_id))
    if adapter and _metadata_safe(adapter):
        metadata.append((ADAPTER_HEADER, adapter))
    return tuple(metadata)


def _metadata_safe(value: str) -> bool:
    """Whether gRPC can carry ``value`` as a metadata value (printable ASCII). A reference that is not
    is malformed anyway: it goes without the routing header and the server refuses the body's."""
    return value.isascii() and value.isprintable()


def replica_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The ``x-lorafleet-replica`` of a response's metadata ("" when the server sent none)."""
    return header_of(metadata, REPLICA_HEADER)


# Deadlines at least this far off are sent as none: gRPC turns a deadline beyond ~1e10 s into one that
# has already passed (``timeout=math.inf`` failed DEADLINE_EXCEEDED at once).
NO_DEADLINE_SECONDS = 1e9


def pick_timeout(call_timeout: float | None, default_timeout: float | None) -> float | None:
    """The call's deadline in seconds: its own ``timeout``, else the client's; ``math.inf`` is none
    (also when the client has a default)."""
    timeout = call_timeout if call_timeout is not None else default_timeout
    if timeout is None:
        return None
    if math.isnan(timeout):
        raise ValueError("timeout must be a number of seconds (math.inf: no deadline), got nan")
    return None if timeout >= NO_DEADLINE_SECONDS else timeout
