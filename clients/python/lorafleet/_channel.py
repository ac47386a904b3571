"""Channel options and per-call metadata shared by the sync and async clients."""

from __future__ import annotations

from lorafleet.errors import REQUEST_ID_HEADER

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024

Metadata = tuple[tuple[str, str], ...]


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def call_metadata(api_key: str | None, request_id: str | None) -> Metadata:
    """The metadata of one call: the bearer key and the request id, each when given."""
    metadata: list[tuple[str, str]] = []
    if api_key is not None:
        metadata.append(("authorization", f"Bearer {api_key}"))
    if request_id is not None:
        metadata.append((REQUEST_ID_HEADER, request_id))
    return tuple(metadata)


def pick_timeout(call_timeout: float | None, default_timeout: float | None) -> float | None:
    return call_timeout if call_timeout is not None else default_timeout
