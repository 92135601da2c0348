from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobPriority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_PRIORITY_UNSPECIFIED: _ClassVar[JobPriority]
    JOB_PRIORITY_INTERACTIVE: _ClassVar[JobPriority]
    JOB_PRIORITY_BATCH: _ClassVar[JobPriority]
    JOB_PRIORITY_CRITICAL: _ClassVar[JobPriority]

class JobStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATUS_UNSPECIFIED: _ClassVar[JobStatus]
    JOB_STATUS_PENDING: _ClassVar[JobStatus]
    JOB_STATUS_SCHEDULED: _ClassVar[JobStatus]
    JOB_STATUS_DISPATCHED: _ClassVar[JobStatus]
    JOB_STATUS_RUNNING: _ClassVar[JobStatus]
    JOB_STATUS_SUCCEEDED: _ClassVar[JobStatus]
    JOB_STATUS_FAILED: _ClassVar[JobStatus]
    JOB_STATUS_CANCELLED: _ClassVar[JobStatus]
    JOB_STATUS_DENIED: _ClassVar[JobStatus]
    JOB_STATUS_TIMEOUT: _ClassVar[JobStatus]
    JOB_STATUS_FAILED_RETRYABLE: _ClassVar[JobStatus]
    JOB_STATUS_FAILED_FATAL: _ClassVar[JobStatus]

class ActorType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTOR_TYPE_UNSPECIFIED: _ClassVar[ActorType]
    ACTOR_TYPE_HUMAN: _ClassVar[ActorType]
    ACTOR_TYPE_SERVICE: _ClassVar[ActorType]

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    ERROR_CODE_PROTOCOL_VERSION_MISMATCH: _ClassVar[ErrorCode]
    ERROR_CODE_PROTOCOL_MALFORMED_PACKET: _ClassVar[ErrorCode]
    ERROR_CODE_PROTOCOL_UNKNOWN_PAYLOAD: _ClassVar[ErrorCode]
    ERROR_CODE_PROTOCOL_SIGNATURE_INVALID: _ClassVar[ErrorCode]
    ERROR_CODE_PROTOCOL_SIGNATURE_MISSING: _ClassVar[ErrorCode]
    ERROR_CODE_JOB_TIMEOUT: _ClassVar[ErrorCode]
    ERROR_CODE_JOB_RESOURCE_EXHAUSTED: _ClassVar[ErrorCode]
    ERROR_CODE_JOB_PERMISSION_DENIED: _ClassVar[ErrorCode]
    ERROR_CODE_JOB_INVALID_INPUT: _ClassVar[ErrorCode]
    ERROR_CODE_JOB_NOT_FOUND: _ClassVar[ErrorCode]
    ERROR_CODE_JOB_DUPLICATE: _ClassVar[ErrorCode]
    ERROR_CODE_JOB_WORKER_UNAVAILABLE: _ClassVar[ErrorCode]
    ERROR_CODE_SAFETY_DENIED: _ClassVar[ErrorCode]
    ERROR_CODE_SAFETY_POLICY_VIOLATION: _ClassVar[ErrorCode]
    ERROR_CODE_SAFETY_RISK_TAG_BLOCKED: _ClassVar[ErrorCode]
    ERROR_CODE_TRANSPORT_PUBLISH_FAILED: _ClassVar[ErrorCode]
    ERROR_CODE_TRANSPORT_SUBSCRIBE_FAILED: _ClassVar[ErrorCode]
    ERROR_CODE_TRANSPORT_CONNECTION_LOST: _ClassVar[ErrorCode]
JOB_PRIORITY_UNSPECIFIED: JobPriority
JOB_PRIORITY_INTERACTIVE: JobPriority
JOB_PRIORITY_BATCH: JobPriority
JOB_PRIORITY_CRITICAL: JobPriority
JOB_STATUS_UNSPECIFIED: JobStatus
JOB_STATUS_PENDING: JobStatus
JOB_STATUS_SCHEDULED: JobStatus
JOB_STATUS_DISPATCHED: JobStatus
JOB_STATUS_RUNNING: JobStatus
JOB_STATUS_SUCCEEDED: JobStatus
JOB_STATUS_FAILED: JobStatus
JOB_STATUS_CANCELLED: JobStatus
JOB_STATUS_DENIED: JobStatus
JOB_STATUS_TIMEOUT: JobStatus
JOB_STATUS_FAILED_RETRYABLE: JobStatus
JOB_STATUS_FAILED_FATAL: JobStatus
ACTOR_TYPE_UNSPECIFIED: ActorType
ACTOR_TYPE_HUMAN: ActorType
ACTOR_TYPE_SERVICE: ActorType
ERROR_CODE_UNSPECIFIED: ErrorCode
ERROR_CODE_PROTOCOL_VERSION_MISMATCH: ErrorCode
ERROR_CODE_PROTOCOL_MALFORMED_PACKET: ErrorCode
ERROR_CODE_PROTOCOL_UNKNOWN_PAYLOAD: ErrorCode
ERROR_CODE_PROTOCOL_SIGNATURE_INVALID: ErrorCode
ERROR_CODE_PROTOCOL_SIGNATURE_MISSING: ErrorCode
ERROR_CODE_JOB_TIMEOUT: ErrorCode
ERROR_CODE_JOB_RESOURCE_EXHAUSTED: ErrorCode
ERROR_CODE_JOB_PERMISSION_DENIED: ErrorCode
ERROR_CODE_JOB_INVALID_INPUT: ErrorCode
ERROR_CODE_JOB_NOT_FOUND: ErrorCode
ERROR_CODE_JOB_DUPLICATE: ErrorCode
ERROR_CODE_JOB_WORKER_UNAVAILABLE: ErrorCode
ERROR_CODE_SAFETY_DENIED: ErrorCode
ERROR_CODE_SAFETY_POLICY_VIOLATION: ErrorCode
ERROR_CODE_SAFETY_RISK_TAG_BLOCKED: ErrorCode
ERROR_CODE_TRANSPORT_PUBLISH_FAILED: ErrorCode
ERROR_CODE_TRANSPORT_SUBSCRIBE_FAILED: ErrorCode
ERROR_CODE_TRANSPORT_CONNECTION_LOST: ErrorCode

class ContextHints(_message.Message):
    __slots__ = ("max_input_tokens", "allow_summarization", "allow_retrieval", "tags")
    MAX_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_SUMMARIZATION_FIELD_NUMBER: _ClassVar[int]
    ALLOW_RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    max_input_tokens: int
    allow_summarization: bool
    allow_retrieval: bool
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_input_tokens: _Optional[int] = ..., allow_summarization: _Optional[bool] = ..., allow_retrieval: _Optional[bool] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("max_input_tokens", "max_output_tokens", "max_total_tokens", "deadline_ms")
    MAX_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    max_input_tokens: int
    max_output_tokens: int
    max_total_tokens: int
    deadline_ms: int
    def __init__(self, max_input_tokens: _Optional[int] = ..., max_output_tokens: _Optional[int] = ..., max_total_tokens: _Optional[int] = ..., deadline_ms: _Optional[int] = ...) -> None: ...

class JobMetadata(_message.Message):
    __slots__ = ("tenant_id", "actor_id", "actor_type", "idempotency_key", "capability", "risk_tags", "requires", "pack_id", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_TYPE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    RISK_TAGS_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_FIELD_NUMBER: _ClassVar[int]
    PACK_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    actor_id: str
    actor_type: ActorType
    idempotency_key: str
    capability: str
    risk_tags: _containers.RepeatedScalarFieldContainer[str]
    requires: _containers.RepeatedScalarFieldContainer[str]
    pack_id: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, tenant_id: _Optional[str] = ..., actor_id: _Optional[str] = ..., actor_type: _Optional[_Union[ActorType, str]] = ..., idempotency_key: _Optional[str] = ..., capability: _Optional[str] = ..., risk_tags: _Optional[_Iterable[str]] = ..., requires: _Optional[_Iterable[str]] = ..., pack_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Compensation(_message.Message):
    __slots__ = ("topic", "context_ptr", "priority", "adapter_id", "env", "memory_id", "context_hints", "budget", "tenant_id", "principal_id", "labels", "meta")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_PTR_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    MEMORY_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_HINTS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    topic: str
    context_ptr: str
    priority: JobPriority
    adapter_id: str
    env: _containers.ScalarMap[str, str]
    memory_id: str
    context_hints: ContextHints
    budget: Budget
    tenant_id: str
    principal_id: str
    labels: _containers.ScalarMap[str, str]
    meta: JobMetadata
    def __init__(self, topic: _Optional[str] = ..., context_ptr: _Optional[str] = ..., priority: _Optional[_Union[JobPriority, str]] = ..., adapter_id: _Optional[str] = ..., env: _Optional[_Mapping[str, str]] = ..., memory_id: _Optional[str] = ..., context_hints: _Optional[_Union[ContextHints, _Mapping]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., tenant_id: _Optional[str] = ..., principal_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., meta: _Optional[_Union[JobMetadata, _Mapping]] = ...) -> None: ...

class JobRequest(_message.Message):
    __slots__ = ("job_id", "topic", "priority", "context_ptr", "adapter_id", "env", "parent_job_id", "workflow_id", "step_index", "memory_id", "context_hints", "budget", "tenant_id", "principal_id", "labels", "meta", "compensation")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_PTR_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    PARENT_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_INDEX_FIELD_NUMBER: _ClassVar[int]
    MEMORY_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_HINTS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    COMPENSATION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    topic: str
    priority: JobPriority
    context_ptr: str
    adapter_id: str
    env: _containers.ScalarMap[str, str]
    parent_job_id: str
    workflow_id: str
    step_index: int
    memory_id: str
    context_hints: ContextHints
    budget: Budget
    tenant_id: str
    principal_id: str
    labels: _containers.ScalarMap[str, str]
    meta: JobMetadata
    compensation: Compensation
    def __init__(self, job_id: _Optional[str] = ..., topic: _Optional[str] = ..., priority: _Optional[_Union[JobPriority, str]] = ..., context_ptr: _Optional[str] = ..., adapter_id: _Optional[str] = ..., env: _Optional[_Mapping[str, str]] = ..., parent_job_id: _Optional[str] = ..., workflow_id: _Optional[str] = ..., step_index: _Optional[int] = ..., memory_id: _Optional[str] = ..., context_hints: _Optional[_Union[ContextHints, _Mapping]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., tenant_id: _Optional[str] = ..., principal_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., meta: _Optional[_Union[JobMetadata, _Mapping]] = ..., compensation: _Optional[_Union[Compensation, _Mapping]] = ...) -> None: ...

class JobResult(_message.Message):
    __slots__ = ("job_id", "status", "result_ptr", "worker_id", "execution_ms", "error_code", "error_message", "artifact_ptrs", "error_code_enum")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESULT_PTR_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_PTRS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_ENUM_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    status: JobStatus
    result_ptr: str
    worker_id: str
    execution_ms: int
    error_code: str
    error_message: str
    artifact_ptrs: _containers.RepeatedScalarFieldContainer[str]
    error_code_enum: ErrorCode
    def __init__(self, job_id: _Optional[str] = ..., status: _Optional[_Union[JobStatus, str]] = ..., result_ptr: _Optional[str] = ..., worker_id: _Optional[str] = ..., execution_ms: _Optional[int] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ..., artifact_ptrs: _Optional[_Iterable[str]] = ..., error_code_enum: _Optional[_Union[ErrorCode, str]] = ...) -> None: ...

class JobProgress(_message.Message):
    __slots__ = ("job_id", "step_id", "percent", "message", "result_ptr", "artifact_ptrs", "status")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESULT_PTR_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_PTRS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    step_id: str
    percent: int
    message: str
    result_ptr: str
    artifact_ptrs: _containers.RepeatedScalarFieldContainer[str]
    status: JobStatus
    def __init__(self, job_id: _Optional[str] = ..., step_id: _Optional[str] = ..., percent: _Optional[int] = ..., message: _Optional[str] = ..., result_ptr: _Optional[str] = ..., artifact_ptrs: _Optional[_Iterable[str]] = ..., status: _Optional[_Union[JobStatus, str]] = ...) -> None: ...

class JobCancel(_message.Message):
    __slots__ = ("job_id", "reason", "requested_by")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_BY_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    reason: str
    requested_by: str
    def __init__(self, job_id: _Optional[str] = ..., reason: _Optional[str] = ..., requested_by: _Optional[str] = ...) -> None: ...
