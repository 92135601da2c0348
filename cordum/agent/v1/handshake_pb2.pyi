from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ComponentRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPONENT_ROLE_UNSPECIFIED: _ClassVar[ComponentRole]
    COMPONENT_ROLE_GATEWAY: _ClassVar[ComponentRole]
    COMPONENT_ROLE_SCHEDULER: _ClassVar[ComponentRole]
    COMPONENT_ROLE_WORKER: _ClassVar[ComponentRole]
    COMPONENT_ROLE_ORCHESTRATOR: _ClassVar[ComponentRole]
    COMPONENT_ROLE_CONTROLLER: _ClassVar[ComponentRole]
COMPONENT_ROLE_UNSPECIFIED: ComponentRole
COMPONENT_ROLE_GATEWAY: ComponentRole
COMPONENT_ROLE_SCHEDULER: ComponentRole
COMPONENT_ROLE_WORKER: ComponentRole
COMPONENT_ROLE_ORCHESTRATOR: ComponentRole
COMPONENT_ROLE_CONTROLLER: ComponentRole

class Handshake(_message.Message):
    __slots__ = ("component_id", "role", "supported_versions", "capabilities", "sdk_version", "ready_topics")
    class CapabilitiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bool
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bool] = ...) -> None: ...
    COMPONENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SUPPORTED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    SDK_VERSION_FIELD_NUMBER: _ClassVar[int]
    READY_TOPICS_FIELD_NUMBER: _ClassVar[int]
    component_id: str
    role: ComponentRole
    supported_versions: _containers.RepeatedScalarFieldContainer[int]
    capabilities: _containers.ScalarMap[str, bool]
    sdk_version: str
    ready_topics: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, component_id: _Optional[str] = ..., role: _Optional[_Union[ComponentRole, str]] = ..., supported_versions: _Optional[_Iterable[int]] = ..., capabilities: _Optional[_Mapping[str, bool]] = ..., sdk_version: _Optional[str] = ..., ready_topics: _Optional[_Iterable[str]] = ...) -> None: ...
