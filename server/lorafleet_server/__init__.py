"""lorafleet's server: gRPC edge, engine and model (import name ``lorafleet_server``, folder ``server/``)."""

from lorafleet_server.onednn import bound_onednn_caches
from lorafleet_server.openmp import set_openmp_wait_policy

set_openmp_wait_policy()  # before any module of the package imports torch (openmp.py says why)
bound_onednn_caches()  # before torch makes its first oneDNN primitive (onednn.py says why)

__version__ = "0.1.0"
