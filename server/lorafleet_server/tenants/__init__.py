"""Tenants: who is calling. For now the API keys (``keys.py``) and their domain errors (``errors.py``).

Nothing here imports gRPC or torch: the keys file is managed by the ``lorafleet keys`` commands and
will be read by the server's authentication interceptor, which maps these errors to status codes.
"""
