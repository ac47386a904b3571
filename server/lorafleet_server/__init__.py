"""lorafleet's server: gRPC edge, engine and model (import name ``lorafleet_server``, folder ``server/``)."""

from lorafleet_server.openmp import set_openmp_wait_policy

set_openmp_wait_policy()  # before any module of the package imports torch (openmp.py says why)

__version__ = "0.1.0"
