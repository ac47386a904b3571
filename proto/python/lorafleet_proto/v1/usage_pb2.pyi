from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetUsageRequest(_message.Message):
    __slots__ = ("start_unix_seconds", "end_unix_seconds", "tenant")
    START_UNIX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    start_unix_seconds: int
    end_unix_seconds: int
    tenant: str
    def __init__(self, start_unix_seconds: _Optional[int] = ..., end_unix_seconds: _Optional[int] = ..., tenant: _Optional[str] = ...) -> None: ...

class UsageRow(_message.Message):
    __slots__ = ("tenant", "adapter", "requests", "prompt_tokens", "generated_tokens")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    adapter: str
    requests: int
    prompt_tokens: int
    generated_tokens: int
    def __init__(self, tenant: _Optional[str] = ..., adapter: _Optional[str] = ..., requests: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("rows", "start_unix_seconds", "end_unix_seconds")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[UsageRow]
    start_unix_seconds: int
    end_unix_seconds: int
    def __init__(self, rows: _Optional[_Iterable[_Union[UsageRow, _Mapping]]] = ..., start_unix_seconds: _Optional[int] = ..., end_unix_seconds: _Optional[int] = ...) -> None: ...
