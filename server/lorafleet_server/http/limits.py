"""The request body limit of the HTTP edge: ``--max-message-bytes``, as gRPC's message limit.

A declared ``Content-Length`` over the limit is refused with 413, the body read and thrown away first
when it is at most ``DRAIN_FACTOR`` times the limit: a server that closes a connection with unread
bytes resets it, and a proxy still uploading (Envoy) lost the 413 and answered its own 503, which
clients retry (an outside review: 2 of 10 such calls). A larger one is refused at once. A chunked
body is cut off (and refused, 413 too) as soon as it passes the limit; no large upload sits in
memory either way. Counted and logged under its route with RESOURCE_EXHAUSTED (gRPC's own limit
refuses an oversized message before any handler runs: that one is neither counted nor logged).
The middleware sits inside ``HttpAuth``: callers without a key are refused first.

The body has a deadline too: all of it within ``seconds`` of the request's head, else 408 (a client
that declared 1,000 bytes and sent 9 held its connection for good). Only the body's reads are timed:
once it is complete, the app's later ``receive()`` calls (a stream listening for the client to go)
wait as long as the response runs.
"""

from __future__ import annotations

import asyncio
import json
import time

import grpc
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorafleet_server.edge.observe import CallObserver
from lorafleet_server.http.errors import error_body
from lorafleet_server.http.routes import NoDeadline, request_id_of, rpc_of


class BodyTooLarge(HTTPException):
    """A chunked body passed the limit while it was being read: a Starlette HTTPException, so FastAPI's
    body reading lets it through (anything else it turns into "error parsing the body", 400) and the
    app's handler answers 413 in OpenAI's shape."""

    def __init__(self, message: str) -> None:
        super().__init__(413, message)


class BodyTimedOut(HTTPException):
    """The body did not arrive in time (``BodyLimit``): 408, in OpenAI's shape like ``BodyTooLarge``."""

    def __init__(self, message: str) -> None:
        super().__init__(408, message)


DRAIN_FACTOR = 4  # a declared body up to this many times the limit is read (and dropped) before the 413


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, calls: CallObserver, seconds: float = 60.0) -> None:
        self._app = app
        self._max = max_bytes
        self._calls = calls
        self._seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max:
            # A client that waits for "100 Continue" has sent nothing yet: reading would invite the body.
            if int(declared) <= DRAIN_FACTOR * self._max and "100-continue" not in headers.get("expect", "").lower():
                await self._drain(receive)
            await self._refuse(scope, send, headers)
            return
        seen = 0
        refused: tuple[grpc.StatusCode, str] | None = None  # how the app's answer (413, 408) is counted
        complete = False  # the body's last part has come: later reads are the app's disconnect watch
        deadline = time.monotonic() + self._seconds

        async def limited() -> Message:
            nonlocal seen, refused, complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                why = f"the request body did not arrive within {self._seconds:g} seconds ({seen} bytes came)"
                refused = (grpc.StatusCode.DEADLINE_EXCEEDED, why)
                raise BodyTimedOut(why) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self._max:
                    refused = (grpc.StatusCode.RESOURCE_EXHAUSTED, self._message)
                    raise BodyTooLarge(self._message)
            else:  # http.disconnect: nothing more will come
                complete = True
            return message

        async def accounting(message: Message) -> None:
            if refused is not None and message["type"] == "http.response.start":  # the app's 413 or 408:
                said = dict(message.get("headers", ()))  # counted before it is sent, under the id it names
                rid = said.get(b"x-request-id", b"").decode("latin-1") or headers.get("x-request-id")
                await self._account(scope, rid, *refused)
            await send(message)

        await self._app(scope, limited, accounting)

    async def _drain(self, receive: Receive) -> None:
        """Read and drop the body (within the body deadline), so the 413 is not lost to a reset."""
        deadline = time.monotonic() + self._seconds
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                return

    @property
    def _message(self) -> str:
        return f"the request body is larger than the server's limit of {self._max} bytes (--max-message-bytes)"

    async def _account(
        self,
        scope: Scope,
        request_id: str | None,
        code: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED,
        error: str | None = None,
    ) -> str:
        rid = request_id_of(request_id)
        async with self._calls.call(rpc_of(scope["method"], scope["path"]) or "other", NoDeadline(), rid) as record:
            record.code, record.error = code, error or self._message
        return rid

    async def _refuse(self, scope: Scope, send: Send, headers: dict[str, str]) -> None:
        rid = await self._account(scope, headers.get("x-request-id"))
        message = self._message
        payload = json.dumps(error_body(message, "invalid_request_error", None, "request_too_large")).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"x-request-id", rid.encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
