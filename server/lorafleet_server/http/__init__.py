"""The OpenAI-compatible HTTP edge: /v1/models, /v1/completions, /v1/chat/completions and /health on
the same engine as the gRPC edge (docs/architecture.md, "The HTTP edge"). No protobuf type enters here."""
