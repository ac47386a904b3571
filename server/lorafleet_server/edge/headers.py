"""The names of the routing headers both edges read and write (gRPC metadata keys, HTTP headers).

A proxy in front of the replicas cannot read request bodies, so a client names the adapter of its
request also in ``x-lorafleet-adapter`` and the proxy hashes on it (deploy/envoy/); every response names
the replica that served it in ``x-lorafleet-replica``. How each edge applies them: grpc/affinity.py and
http/app.py.
"""

from __future__ import annotations

ADAPTER_HEADER = "x-lorafleet-adapter"
REPLICA_HEADER = "x-lorafleet-replica"
