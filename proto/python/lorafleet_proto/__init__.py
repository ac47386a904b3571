"""The lorafleet gRPC API as generated Python code (distribution ``lorafleet-proto``).

``lorafleet_proto.v1`` holds the protobuf messages and gRPC stubs generated from ``proto/lorafleet/v1``
by ``scripts/gen_proto.sh``. Both the server and the Python client depend on this one distribution.
"""
