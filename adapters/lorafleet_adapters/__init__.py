"""lorafleet's adapter store and tiers (import name ``lorafleet_adapters``, folder ``adapters/``).

References, PEFT validation, the versioned store, host cache and device slots. Knows nothing of gRPC.
"""
