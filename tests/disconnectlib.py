"""A client that leaves at a known point, for tests of what the server does when its caller goes."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit


def post_then_leave(
    url: str, path: str, body: dict[str, Any], headers: dict[str, str], until: Callable[[], bool]
) -> None:
    """POST ``body`` as JSON on a connection of its own, wait until ``until()`` says the server has the
    request (queued in the engine, say), then close the connection without reading the answer. A client
    timeout in its place could fire before the server had even read the request on busy cores, and the
    test then waited for a cancel that never came (an outside review)."""
    target = urlsplit(url)
    assert target.hostname is not None
    payload = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", f"host: {target.netloc}", "content-type: application/json"]
    head += [f"{k}: {v}" for k, v in headers.items()] + [f"content-length: {len(payload)}"]
    with socket.create_connection((target.hostname, target.port or 80), timeout=30) as conn:
        conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        give_up = time.monotonic() + 30
        while not until():
            assert time.monotonic() < give_up, "the server never had the request"
            time.sleep(0.01)
