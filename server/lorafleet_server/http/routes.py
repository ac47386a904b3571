"""The HTTP routes' names for accounting, and the request id.

Each route is counted in the existing request families (``lorafleet_requests_total``,
``lorafleet_request_duration_seconds``) under one ``rpc`` label value, ``"<METHOD> <path template>"``;
anything else is ``"other"``, so the label stays bounded whatever paths callers send.
"""

from __future__ import annotations

import re
import uuid

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

LIST_MODELS = "GET /v1/models"
GET_MODEL = "GET /v1/models/{model}"
COMPLETIONS = "POST /v1/completions"
CHAT_COMPLETIONS = "POST /v1/chat/completions"
EMBEDDINGS = "POST /v1/embeddings"

ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/v1/models"): LIST_MODELS,
    ("POST", "/v1/completions"): COMPLETIONS,
    ("POST", "/v1/chat/completions"): CHAT_COMPLETIONS,
    ("POST", "/v1/embeddings"): EMBEDDINGS,
}


ROUTE_NAMES = (*ROUTES.values(), GET_MODEL)  # every rpc label value of a route we serve


def rpc_of(method: str, path: str) -> str | None:
    """The ``rpc`` label of a request, None for a path we do not serve."""
    if method == "GET" and path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
        return GET_MODEL
    return ROUTES.get((method, path.rstrip("/") or "/"))


def request_id_of(header: str | None) -> str:
    """The caller's ``x-request-id`` when it is a sane token, else a fresh one (as at the gRPC edge)."""
    if header is not None and _REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


class NoDeadline:
    """The call context ``CallObserver.call`` reads: HTTP callers send no deadline."""

    def time_remaining(self) -> float | None:
        return None
