"""The start-up probe of the server's ports (server/lorafleet_server/listen.py)."""

from __future__ import annotations

import socket

import pytest

from lorafleet_server.errors import StartupError
from lorafleet_server.listen import check_can_listen


def test_a_listening_port_is_refused_and_a_free_one_passes() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=rf"--port {port}: cannot listen on 127.0.0.1:{port} .*in use"):
            check_can_listen("127.0.0.1", port, "--port")
        with pytest.raises(StartupError, match="in use"):  # every address: 0.0.0.0 covers 127.0.0.1
            check_can_listen("0.0.0.0", port, "--port")
    check_can_listen("127.0.0.1", port, "--port")  # closed again: free
    check_can_listen("127.0.0.1", 0, "--port")  # any free port: nothing to probe


def test_a_connection_in_time_wait_does_not_count_as_in_use() -> None:
    """The listeners set SO_REUSEADDR; a restarted server whose old connections linger must start."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC, uvicorn and the metrics server do
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server side closes first: its end goes to TIME_WAIT
        client.close()
    check_can_listen("127.0.0.1", port, "--port")


def test_an_address_that_does_not_resolve_is_refused() -> None:
    with pytest.raises(StartupError, match=r"--http-port 8000: cannot resolve the address 'no-such-host\.invalid'"):
        check_can_listen("no-such-host.invalid", 8000, "--http-port")
