"""lorafleet's server: gRPC edge, engine and model (import name ``lorafleet_server``, folder ``server/``)."""

__version__ = "0.1.0"
