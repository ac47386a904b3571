"""Whether the server's ports can be listened on, asked before the model loads.

The listeners themselves bind after the model has loaded (a minute or more for a large model): a port
another process holds was found only then. A probe bind at start reports it at once. It is a probe,
not a reservation: a port taken between the probe and the real bind still fails there, as before.
"""

from __future__ import annotations

import errno
import socket

from lorafleet_server.errors import StartupError


def check_can_listen(host: str, port: int, flag: str) -> None:
    """StartupError when ``port`` (non-zero) is in use on an address ``host`` resolves to, naming
    ``flag``. The probe sets SO_REUSEADDR like the real listeners (gRPC, uvicorn and the metrics
    server all do), so a port held only by connections in TIME_WAIT counts as free, as it is."""
    if port == 0:  # any free port
        return
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"{flag} {port}: cannot resolve the address {host!r}: {exc.strerror}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):  # no such interface: not ours to say
                    continue
                hint = "; is another server running there?" if exc.errno == errno.EADDRINUSE else ""
                raise StartupError(
                    f"{flag} {port}: cannot listen on {address[0]}:{port} ({exc.strerror}){hint}"
                ) from None
