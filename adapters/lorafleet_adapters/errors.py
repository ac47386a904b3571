"""Domain exceptions of the adapter layer.

The serving layer maps each class to one gRPC status code; nothing here knows about gRPC.
"""

from __future__ import annotations


class AdapterError(Exception):
    """Base class of every error raised by `adapters`."""


class InvalidAdapterRef(AdapterError):
    """A malformed adapter reference, tenant, name or version (INVALID_ARGUMENT)."""


class AdapterNotFound(AdapterError):
    """No such tenant, adapter or version in the store (NOT_FOUND)."""


class AdapterFormatError(AdapterError):
    """Files that are unreadable, unsupported, corrupted or over a size cap (FAILED_PRECONDITION)."""


class AdapterIncompatible(AdapterError):
    """A well-formed adapter that does not fit the base model (FAILED_PRECONDITION)."""


class StoreUnavailable(AdapterError):
    """The store root is missing or unreadable (UNAVAILABLE)."""


class InvalidStoreLocation(StoreUnavailable):
    """A malformed store location (an s3:// URL, an endpoint URL): refused at start, before any call."""
