from cordum.agent.v1 import job_pb2 as _job_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecisionType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_TYPE_UNSPECIFIED: _ClassVar[DecisionType]
    DECISION_TYPE_ALLOW: _ClassVar[DecisionType]
    DECISION_TYPE_DENY: _ClassVar[DecisionType]
    DECISION_TYPE_REQUIRE_HUMAN: _ClassVar[DecisionType]
    DECISION_TYPE_THROTTLE: _ClassVar[DecisionType]
    DECISION_TYPE_ALLOW_WITH_CONSTRAINTS: _ClassVar[DecisionType]
    DECISION_TYPE_QUARANTINE: _ClassVar[DecisionType]
    DECISION_TYPE_REDACT: _ClassVar[DecisionType]
DECISION_TYPE_UNSPECIFIED: DecisionType
DECISION_TYPE_ALLOW: DecisionType
DECISION_TYPE_DENY: DecisionType
DECISION_TYPE_REQUIRE_HUMAN: DecisionType
DECISION_TYPE_THROTTLE: DecisionType
DECISION_TYPE_ALLOW_WITH_CONSTRAINTS: DecisionType
DECISION_TYPE_QUARANTINE: DecisionType
DECISION_TYPE_REDACT: DecisionType

class PolicyCheckRequest(_message.Message):
    __slots__ = ("job_id", "topic", "tenant", "priority", "estimated_cost", "budget", "principal_id", "labels", "memory_id", "effective_config", "meta", "input_content", "input_content_type", "input_size_bytes")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COST_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_ID_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_CONFIG_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    INPUT_CONTENT_FIELD_NUMBER: _ClassVar[int]
    INPUT_CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    topic: str
    tenant: str
    priority: _job_pb2.JobPriority
    estimated_cost: float
    budget: _job_pb2.Budget
    principal_id: str
    labels: _containers.ScalarMap[str, str]
    memory_id: str
    effective_config: bytes
    meta: _job_pb2.JobMetadata
    input_content: bytes
    input_content_type: str
    input_size_bytes: int
    def __init__(self, job_id: _Optional[str] = ..., topic: _Optional[str] = ..., tenant: _Optional[str] = ..., priority: _Optional[_Union[_job_pb2.JobPriority, str]] = ..., estimated_cost: _Optional[float] = ..., budget: _Optional[_Union[_job_pb2.Budget, _Mapping]] = ..., principal_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., memory_id: _Optional[str] = ..., effective_config: _Optional[bytes] = ..., meta: _Optional[_Union[_job_pb2.JobMetadata, _Mapping]] = ..., input_content: _Optional[bytes] = ..., input_content_type: _Optional[str] = ..., input_size_bytes: _Optional[int] = ...) -> None: ...

class BudgetConstraints(_message.Message):
    __slots__ = ("max_runtime_ms", "max_retries", "max_artifact_bytes", "max_concurrent_jobs")
    MAX_RUNTIME_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    MAX_ARTIFACT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_JOBS_FIELD_NUMBER: _ClassVar[int]
    max_runtime_ms: int
    max_retries: int
    max_artifact_bytes: int
    max_concurrent_jobs: int
    def __init__(self, max_runtime_ms: _Optional[int] = ..., max_retries: _Optional[int] = ..., max_artifact_bytes: _Optional[int] = ..., max_concurrent_jobs: _Optional[int] = ...) -> None: ...

class SandboxProfile(_message.Message):
    __slots__ = ("isolated", "network_allowlist", "fs_read_only", "fs_read_write")
    ISOLATED_FIELD_NUMBER: _ClassVar[int]
    NETWORK_ALLOWLIST_FIELD_NUMBER: _ClassVar[int]
    FS_READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    FS_READ_WRITE_FIELD_NUMBER: _ClassVar[int]
    isolated: bool
    network_allowlist: _containers.RepeatedScalarFieldContainer[str]
    fs_read_only: _containers.RepeatedScalarFieldContainer[str]
    fs_read_write: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, isolated: _Optional[bool] = ..., network_allowlist: _Optional[_Iterable[str]] = ..., fs_read_only: _Optional[_Iterable[str]] = ..., fs_read_write: _Optional[_Iterable[str]] = ...) -> None: ...

class ToolchainConstraints(_message.Message):
    __slots__ = ("allowed_tools", "allowed_commands")
    ALLOWED_TOOLS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_COMMANDS_FIELD_NUMBER: _ClassVar[int]
    allowed_tools: _containers.RepeatedScalarFieldContainer[str]
    allowed_commands: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, allowed_tools: _Optional[_Iterable[str]] = ..., allowed_commands: _Optional[_Iterable[str]] = ...) -> None: ...

class DiffConstraints(_message.Message):
    __slots__ = ("max_files", "max_lines", "deny_path_globs")
    MAX_FILES_FIELD_NUMBER: _ClassVar[int]
    MAX_LINES_FIELD_NUMBER: _ClassVar[int]
    DENY_PATH_GLOBS_FIELD_NUMBER: _ClassVar[int]
    max_files: int
    max_lines: int
    deny_path_globs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_files: _Optional[int] = ..., max_lines: _Optional[int] = ..., deny_path_globs: _Optional[_Iterable[str]] = ...) -> None: ...

class PolicyConstraints(_message.Message):
    __slots__ = ("budgets", "sandbox", "toolchain", "diff", "redaction_level")
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_FIELD_NUMBER: _ClassVar[int]
    TOOLCHAIN_FIELD_NUMBER: _ClassVar[int]
    DIFF_FIELD_NUMBER: _ClassVar[int]
    REDACTION_LEVEL_FIELD_NUMBER: _ClassVar[int]
    budgets: BudgetConstraints
    sandbox: SandboxProfile
    toolchain: ToolchainConstraints
    diff: DiffConstraints
    redaction_level: str
    def __init__(self, budgets: _Optional[_Union[BudgetConstraints, _Mapping]] = ..., sandbox: _Optional[_Union[SandboxProfile, _Mapping]] = ..., toolchain: _Optional[_Union[ToolchainConstraints, _Mapping]] = ..., diff: _Optional[_Union[DiffConstraints, _Mapping]] = ..., redaction_level: _Optional[str] = ...) -> None: ...

class PolicyRemediation(_message.Message):
    __slots__ = ("id", "title", "summary", "replacement_topic", "replacement_capability", "add_labels", "remove_labels")
    class AddLabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    REPLACEMENT_TOPIC_FIELD_NUMBER: _ClassVar[int]
    REPLACEMENT_CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    ADD_LABELS_FIELD_NUMBER: _ClassVar[int]
    REMOVE_LABELS_FIELD_NUMBER: _ClassVar[int]
    id: str
    title: str
    summary: str
    replacement_topic: str
    replacement_capability: str
    add_labels: _containers.ScalarMap[str, str]
    remove_labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., title: _Optional[str] = ..., summary: _Optional[str] = ..., replacement_topic: _Optional[str] = ..., replacement_capability: _Optional[str] = ..., add_labels: _Optional[_Mapping[str, str]] = ..., remove_labels: _Optional[_Iterable[str]] = ...) -> None: ...

class PolicyCheckResponse(_message.Message):
    __slots__ = ("decision", "reason", "redacted_context_ptr", "policy_snapshot", "rule_id", "constraints", "approval_required", "approval_ref", "remediations")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REDACTED_CONTEXT_PTR_FIELD_NUMBER: _ClassVar[int]
    POLICY_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    RULE_ID_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINTS_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_REF_FIELD_NUMBER: _ClassVar[int]
    REMEDIATIONS_FIELD_NUMBER: _ClassVar[int]
    decision: DecisionType
    reason: str
    redacted_context_ptr: str
    policy_snapshot: str
    rule_id: str
    constraints: PolicyConstraints
    approval_required: bool
    approval_ref: str
    remediations: _containers.RepeatedCompositeFieldContainer[PolicyRemediation]
    def __init__(self, decision: _Optional[_Union[DecisionType, str]] = ..., reason: _Optional[str] = ..., redacted_context_ptr: _Optional[str] = ..., policy_snapshot: _Optional[str] = ..., rule_id: _Optional[str] = ..., constraints: _Optional[_Union[PolicyConstraints, _Mapping]] = ..., approval_required: _Optional[bool] = ..., approval_ref: _Optional[str] = ..., remediations: _Optional[_Iterable[_Union[PolicyRemediation, _Mapping]]] = ...) -> None: ...

class ListSnapshotsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSnapshotsResponse(_message.Message):
    __slots__ = ("snapshots",)
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    snapshots: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, snapshots: _Optional[_Iterable[str]] = ...) -> None: ...
