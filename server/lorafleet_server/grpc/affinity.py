"""Adapter affinity at the gRPC edge: the metadata a proxy routes on and the replica that answered.

A proxy in front of the replicas (Envoy, deploy/envoy/) cannot read protobuf bodies, so a client sends
the adapter reference of its request also as metadata ``x-lorafleet-adapter`` and the proxy hashes on
it: each adapter stays hot on few replicas. The body stays the truth; a request whose header names
another adapter than its body is refused (INVALID_ARGUMENT), so a routing header can never silently
send one adapter's traffic to the replicas that hold another. A request without the header (a direct
client) is served as before.

Every response names the serving replica in ``x-lorafleet-replica`` (``--replica-id``): in the
initial metadata of a successful call, and in the trailing metadata of every call, failed ones
included (a failed unary call sends no initial metadata, so a proxy may still retry an
``UNAVAILABLE`` that no response byte preceded).

The one place that applies this is the RPC wrapper (rpc.py), where the parsed request is known.
"""

from __future__ import annotations

import grpc

from lorafleet_server.edge.headers import ADAPTER_HEADER, REPLICA_HEADER
from lorafleet_server.errors import InvalidRequest


def header_adapter(context: grpc.aio.ServicerContext) -> str | None:
    """The caller's ``x-lorafleet-adapter`` metadata, or None when it sent none."""
    for key, value in context.invocation_metadata() or ():
        if key == ADAPTER_HEADER:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None


def check_adapter_header(context: grpc.aio.ServicerContext, body_adapter: str) -> None:
    """Raise InvalidRequest when the routing header names another adapter than the request body."""
    header = header_adapter(context)
    if header is not None and header != body_adapter:
        raise InvalidRequest(
            f"metadata {ADAPTER_HEADER}={header[:200]!r} disagrees with the request's adapter "
            f"{body_adapter[:200]!r}: send the same reference in both (or no header)"
        )


def replica_metadata(replica_id: str) -> tuple[tuple[str, str], ...]:
    """The response metadata naming this replica (none when it has no id)."""
    return ((REPLICA_HEADER, replica_id),) if replica_id else ()
