from cordum.agent.v1 import safety_pb2 as _safety_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PolicyCheckBatchRequest(_message.Message):
    __slots__ = ("method", "requests")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    method: str
    requests: _containers.RepeatedCompositeFieldContainer[_safety_pb2.PolicyCheckRequest]
    def __init__(self, method: _Optional[str] = ..., requests: _Optional[_Iterable[_Union[_safety_pb2.PolicyCheckRequest, _Mapping]]] = ...) -> None: ...

class PolicyCheckBatchItem(_message.Message):
    __slots__ = ("response", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: _safety_pb2.PolicyCheckResponse
    error: str
    def __init__(self, response: _Optional[_Union[_safety_pb2.PolicyCheckResponse, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class PolicyCheckBatchResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[PolicyCheckBatchItem]
    def __init__(self, items: _Optional[_Iterable[_Union[PolicyCheckBatchItem, _Mapping]]] = ...) -> None: ...
