from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputDecision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_DECISION_ALLOW: _ClassVar[OutputDecision]
    OUTPUT_DECISION_QUARANTINE: _ClassVar[OutputDecision]
    OUTPUT_DECISION_REDACT: _ClassVar[OutputDecision]
OUTPUT_DECISION_ALLOW: OutputDecision
OUTPUT_DECISION_QUARANTINE: OutputDecision
OUTPUT_DECISION_REDACT: OutputDecision

class OutputCheckRequest(_message.Message):
    __slots__ = ("job_id", "topic", "tenant", "labels", "result_ptr", "artifact_ptrs", "error_message", "error_code", "worker_id", "execution_ms", "output_size_bytes", "content_hash", "workflow_id", "step_id", "output_content", "capabilities", "risk_tags", "principal_id", "pack_id", "content_type", "original_labels", "content_phase")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class OriginalLabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    RESULT_PTR_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_PTRS_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_MS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_CONTENT_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    RISK_TAGS_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_ID_FIELD_NUMBER: _ClassVar[int]
    PACK_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_LABELS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_PHASE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    topic: str
    tenant: str
    labels: _containers.ScalarMap[str, str]
    result_ptr: str
    artifact_ptrs: _containers.RepeatedScalarFieldContainer[str]
    error_message: str
    error_code: str
    worker_id: str
    execution_ms: int
    output_size_bytes: int
    content_hash: str
    workflow_id: str
    step_id: str
    output_content: bytes
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    risk_tags: _containers.RepeatedScalarFieldContainer[str]
    principal_id: str
    pack_id: str
    content_type: str
    original_labels: _containers.ScalarMap[str, str]
    content_phase: bool
    def __init__(self, job_id: _Optional[str] = ..., topic: _Optional[str] = ..., tenant: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., result_ptr: _Optional[str] = ..., artifact_ptrs: _Optional[_Iterable[str]] = ..., error_message: _Optional[str] = ..., error_code: _Optional[str] = ..., worker_id: _Optional[str] = ..., execution_ms: _Optional[int] = ..., output_size_bytes: _Optional[int] = ..., content_hash: _Optional[str] = ..., workflow_id: _Optional[str] = ..., step_id: _Optional[str] = ..., output_content: _Optional[bytes] = ..., capabilities: _Optional[_Iterable[str]] = ..., risk_tags: _Optional[_Iterable[str]] = ..., principal_id: _Optional[str] = ..., pack_id: _Optional[str] = ..., content_type: _Optional[str] = ..., original_labels: _Optional[_Mapping[str, str]] = ..., content_phase: _Optional[bool] = ...) -> None: ...

class OutputFinding(_message.Message):
    __slots__ = ("type", "severity", "detail", "offset", "length", "scanner", "confidence", "matched_pattern")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    SCANNER_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    MATCHED_PATTERN_FIELD_NUMBER: _ClassVar[int]
    type: str
    severity: str
    detail: str
    offset: int
    length: int
    scanner: str
    confidence: float
    matched_pattern: str
    def __init__(self, type: _Optional[str] = ..., severity: _Optional[str] = ..., detail: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., scanner: _Optional[str] = ..., confidence: _Optional[float] = ..., matched_pattern: _Optional[str] = ...) -> None: ...

class OutputCheckResponse(_message.Message):
    __slots__ = ("decision", "reason", "rule_id", "policy_snapshot", "findings", "redacted_ptr", "no_output_rules", "metadata_suffices", "content_sha256")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RULE_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    REDACTED_PTR_FIELD_NUMBER: _ClassVar[int]
    NO_OUTPUT_RULES_FIELD_NUMBER: _ClassVar[int]
    METADATA_SUFFICES_FIELD_NUMBER: _ClassVar[int]
    CONTENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    decision: OutputDecision
    reason: str
    rule_id: str
    policy_snapshot: str
    findings: _containers.RepeatedCompositeFieldContainer[OutputFinding]
    redacted_ptr: str
    no_output_rules: bool
    metadata_suffices: bool
    content_sha256: str
    def __init__(self, decision: _Optional[_Union[OutputDecision, str]] = ..., reason: _Optional[str] = ..., rule_id: _Optional[str] = ..., policy_snapshot: _Optional[str] = ..., findings: _Optional[_Iterable[_Union[OutputFinding, _Mapping]]] = ..., redacted_ptr: _Optional[str] = ..., no_output_rules: _Optional[bool] = ..., metadata_suffices: _Optional[bool] = ..., content_sha256: _Optional[str] = ...) -> None: ...
