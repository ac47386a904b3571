"""What the two edges (gRPC, lorafleet_server.grpc; HTTP, lorafleet_server.http) share: the one table
from domain exceptions to status codes, the accounting of a call (metrics, request log), the principal
of a tenant key and the names of the routing headers. No protobuf and no HTTP framework here; the edges
import this package, never each other."""
