"""Tenants: who is calling. The API keys (``keys.py``) and their domain errors (``errors.py``).

Nothing here imports gRPC or torch: the keys file is managed by the ``lorafleet keys`` commands and
read by the server's authentication interceptor (``grpc/auth.py``), which maps these errors to status
codes through the one status table.
"""
