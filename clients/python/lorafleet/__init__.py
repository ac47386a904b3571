"""Python client of the lorafleet gRPC service (multi-tenant LoRA serving).

from lorafleet import LoraFleetClient, Sampling

with LoraFleetClient("127.0.0.1:50051") as client:
    print(client.generate("Hello", adapter="acme/support", sampling=Sampling(max_new_tokens=32)).text)
"""

from lorafleet.aio import AsyncLoraFleetClient
from lorafleet.client import LoraFleetClient
from lorafleet.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    LoraFleetError,
    NotFoundError,
    PermissionDeniedError,
    RequestCancelledError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from lorafleet.models import (
    AdapterInfo,
    AdapterLoad,
    AdapterManifest,
    AdapterSwap,
    AdapterSwapFailure,
    AdapterTier,
    AdapterUnload,
    AdapterVersionInfo,
    Classification,
    Completion,
    Embedding,
    FinishReason,
    LabelScore,
    Message,
    ModelInfo,
    RefreshResult,
    Sampling,
    Tokens,
    UsageReport,
    UsageRow,
)
from lorafleet.stream import AsyncGenerationStream, GenerationStream

__version__ = "0.1.0"

__all__ = [
    "AdapterInfo",
    "AdapterLoad",
    "AdapterManifest",
    "AdapterSwap",
    "AdapterSwapFailure",
    "AdapterTier",
    "AdapterUnload",
    "AdapterVersionInfo",
    "AsyncGenerationStream",
    "AsyncLoraFleetClient",
    "Classification",
    "Completion",
    "DeadlineExceededError",
    "Embedding",
    "FailedPreconditionError",
    "FinishReason",
    "GenerationStream",
    "InvalidArgumentError",
    "LabelScore",
    "LoraFleetClient",
    "LoraFleetError",
    "Message",
    "ModelInfo",
    "NotFoundError",
    "PermissionDeniedError",
    "RefreshResult",
    "RequestCancelledError",
    "ResourceExhaustedError",
    "Sampling",
    "Tokens",
    "UnauthenticatedError",
    "UnavailableError",
    "UsageReport",
    "UsageRow",
    "__version__",
]
