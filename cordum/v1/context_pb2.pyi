from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ContextMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONTEXT_MODE_UNSPECIFIED: _ClassVar[ContextMode]
    CONTEXT_MODE_RAW: _ClassVar[ContextMode]
    CONTEXT_MODE_CHAT: _ClassVar[ContextMode]
    CONTEXT_MODE_RAG: _ClassVar[ContextMode]

class MemoryWriteKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEMORY_WRITE_KIND_UNSPECIFIED: _ClassVar[MemoryWriteKind]
    MEMORY_WRITE_KIND_RAW: _ClassVar[MemoryWriteKind]
    MEMORY_WRITE_KIND_CHAT: _ClassVar[MemoryWriteKind]
    MEMORY_WRITE_KIND_SHARED_POLICY_STATE: _ClassVar[MemoryWriteKind]
    MEMORY_WRITE_KIND_SHARED_TRUST_STATE: _ClassVar[MemoryWriteKind]
    MEMORY_WRITE_KIND_SHARED_DIRECTIVE: _ClassVar[MemoryWriteKind]
CONTEXT_MODE_UNSPECIFIED: ContextMode
CONTEXT_MODE_RAW: ContextMode
CONTEXT_MODE_CHAT: ContextMode
CONTEXT_MODE_RAG: ContextMode
MEMORY_WRITE_KIND_UNSPECIFIED: MemoryWriteKind
MEMORY_WRITE_KIND_RAW: MemoryWriteKind
MEMORY_WRITE_KIND_CHAT: MemoryWriteKind
MEMORY_WRITE_KIND_SHARED_POLICY_STATE: MemoryWriteKind
MEMORY_WRITE_KIND_SHARED_TRUST_STATE: MemoryWriteKind
MEMORY_WRITE_KIND_SHARED_DIRECTIVE: MemoryWriteKind

class BuildWindowRequest(_message.Message):
    __slots__ = ("memory_id", "mode", "model", "logical_payload", "max_input_tokens", "max_output_tokens")
    MEMORY_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    memory_id: str
    mode: ContextMode
    model: str
    logical_payload: bytes
    max_input_tokens: int
    max_output_tokens: int
    def __init__(self, memory_id: _Optional[str] = ..., mode: _Optional[_Union[ContextMode, str]] = ..., model: _Optional[str] = ..., logical_payload: _Optional[bytes] = ..., max_input_tokens: _Optional[int] = ..., max_output_tokens: _Optional[int] = ...) -> None: ...

class ModelMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class BuildWindowResponse(_message.Message):
    __slots__ = ("messages", "input_tokens", "output_tokens")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ModelMessage]
    input_tokens: int
    output_tokens: int
    def __init__(self, messages: _Optional[_Iterable[_Union[ModelMessage, _Mapping]]] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ...) -> None: ...

class UpdateMemoryRequest(_message.Message):
    __slots__ = ("memory_id", "logical_payload", "model_response", "mode", "tenant_id", "writer_agent_id", "target_agent_id", "provenance_ref", "provenance_verified", "write_kind", "policy_state_mutation")
    MEMORY_ID_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    MODEL_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    WRITER_AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_REF_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_VERIFIED_FIELD_NUMBER: _ClassVar[int]
    WRITE_KIND_FIELD_NUMBER: _ClassVar[int]
    POLICY_STATE_MUTATION_FIELD_NUMBER: _ClassVar[int]
    memory_id: str
    logical_payload: bytes
    model_response: bytes
    mode: ContextMode
    tenant_id: str
    writer_agent_id: str
    target_agent_id: str
    provenance_ref: str
    provenance_verified: bool
    write_kind: MemoryWriteKind
    policy_state_mutation: bool
    def __init__(self, memory_id: _Optional[str] = ..., logical_payload: _Optional[bytes] = ..., model_response: _Optional[bytes] = ..., mode: _Optional[_Union[ContextMode, str]] = ..., tenant_id: _Optional[str] = ..., writer_agent_id: _Optional[str] = ..., target_agent_id: _Optional[str] = ..., provenance_ref: _Optional[str] = ..., provenance_verified: _Optional[bool] = ..., write_kind: _Optional[_Union[MemoryWriteKind, str]] = ..., policy_state_mutation: _Optional[bool] = ...) -> None: ...

class UpdateMemoryResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
