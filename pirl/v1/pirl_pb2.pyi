from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("robot_id", "edge_version", "backend", "lowest_pending_sequence")
    ROBOT_ID_FIELD_NUMBER: _ClassVar[int]
    EDGE_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    LOWEST_PENDING_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    robot_id: str
    edge_version: str
    backend: str
    lowest_pending_sequence: int
    def __init__(self, robot_id: _Optional[str] = ..., edge_version: _Optional[str] = ..., backend: _Optional[str] = ..., lowest_pending_sequence: _Optional[int] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("policy_version", "next_sequence", "max_version_lag", "max_record_bytes", "spec")
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    NEXT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    MAX_VERSION_LAG_FIELD_NUMBER: _ClassVar[int]
    MAX_RECORD_BYTES_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    policy_version: int
    next_sequence: int
    max_version_lag: int
    max_record_bytes: int
    spec: PolicySpec
    def __init__(self, policy_version: _Optional[int] = ..., next_sequence: _Optional[int] = ..., max_version_lag: _Optional[int] = ..., max_record_bytes: _Optional[int] = ..., spec: _Optional[_Union[PolicySpec, _Mapping]] = ...) -> None: ...

class PolicySpec(_message.Message):
    __slots__ = ("observation", "chain", "stochastic", "noise_method", "n_action_steps")
    class ObservationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: TensorSpec
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[TensorSpec, _Mapping]] = ...) -> None: ...
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    STOCHASTIC_FIELD_NUMBER: _ClassVar[int]
    NOISE_METHOD_FIELD_NUMBER: _ClassVar[int]
    N_ACTION_STEPS_FIELD_NUMBER: _ClassVar[int]
    observation: _containers.MessageMap[str, TensorSpec]
    chain: TensorSpec
    stochastic: TensorSpec
    noise_method: str
    n_action_steps: int
    def __init__(self, observation: _Optional[_Mapping[str, TensorSpec]] = ..., chain: _Optional[_Union[TensorSpec, _Mapping]] = ..., stochastic: _Optional[_Union[TensorSpec, _Mapping]] = ..., noise_method: _Optional[str] = ..., n_action_steps: _Optional[int] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("dtype", "shape")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("robot_id", "policy_version", "spool_records", "control_rate_hz", "lowest_pending_sequence")
    ROBOT_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SPOOL_RECORDS_FIELD_NUMBER: _ClassVar[int]
    CONTROL_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    LOWEST_PENDING_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    robot_id: str
    policy_version: int
    spool_records: int
    control_rate_hz: float
    lowest_pending_sequence: int
    def __init__(self, robot_id: _Optional[str] = ..., policy_version: _Optional[int] = ..., spool_records: _Optional[int] = ..., control_rate_hz: _Optional[float] = ..., lowest_pending_sequence: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("policy_version",)
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    policy_version: int
    def __init__(self, policy_version: _Optional[int] = ...) -> None: ...

class RolloutRecord(_message.Message):
    __slots__ = ("robot_id", "episode_id", "sequence", "step_index", "policy_version", "observation", "chain", "stochastic", "noise_level", "log_prob", "value", "reward", "terminated", "truncated", "success", "env_steps", "final_observation", "safety", "label", "intervention")
    class ObservationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    class FinalObservationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    ROBOT_ID_FIELD_NUMBER: _ClassVar[int]
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STEP_INDEX_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    STOCHASTIC_FIELD_NUMBER: _ClassVar[int]
    NOISE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    TERMINATED_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    ENV_STEPS_FIELD_NUMBER: _ClassVar[int]
    FINAL_OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    SAFETY_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INTERVENTION_FIELD_NUMBER: _ClassVar[int]
    robot_id: str
    episode_id: str
    sequence: int
    step_index: int
    policy_version: int
    observation: _containers.MessageMap[str, Tensor]
    chain: Tensor
    stochastic: Tensor
    noise_level: float
    log_prob: float
    value: float
    reward: float
    terminated: bool
    truncated: bool
    success: bool
    env_steps: int
    final_observation: _containers.MessageMap[str, Tensor]
    safety: SafetyMarks
    label: EpisodeLabel
    intervention: Intervention
    def __init__(self, robot_id: _Optional[str] = ..., episode_id: _Optional[str] = ..., sequence: _Optional[int] = ..., step_index: _Optional[int] = ..., policy_version: _Optional[int] = ..., observation: _Optional[_Mapping[str, Tensor]] = ..., chain: _Optional[_Union[Tensor, _Mapping]] = ..., stochastic: _Optional[_Union[Tensor, _Mapping]] = ..., noise_level: _Optional[float] = ..., log_prob: _Optional[float] = ..., value: _Optional[float] = ..., reward: _Optional[float] = ..., terminated: _Optional[bool] = ..., truncated: _Optional[bool] = ..., success: _Optional[bool] = ..., env_steps: _Optional[int] = ..., final_observation: _Optional[_Mapping[str, Tensor]] = ..., safety: _Optional[_Union[SafetyMarks, _Mapping]] = ..., label: _Optional[_Union[EpisodeLabel, _Mapping]] = ..., intervention: _Optional[_Union[Intervention, _Mapping]] = ...) -> None: ...

class EpisodeLabel(_message.Message):
    __slots__ = ("source", "verdict", "detector_score")
    class Source(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        SOURCE_UNSPECIFIED: _ClassVar[EpisodeLabel.Source]
        ENV: _ClassVar[EpisodeLabel.Source]
        OPERATOR: _ClassVar[EpisodeLabel.Source]
        DETECTOR: _ClassVar[EpisodeLabel.Source]
        TIME_LIMIT: _ClassVar[EpisodeLabel.Source]
    SOURCE_UNSPECIFIED: EpisodeLabel.Source
    ENV: EpisodeLabel.Source
    OPERATOR: EpisodeLabel.Source
    DETECTOR: EpisodeLabel.Source
    TIME_LIMIT: EpisodeLabel.Source
    class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        VERDICT_UNSPECIFIED: _ClassVar[EpisodeLabel.Verdict]
        SUCCESS: _ClassVar[EpisodeLabel.Verdict]
        FAILURE: _ClassVar[EpisodeLabel.Verdict]
        ABORT: _ClassVar[EpisodeLabel.Verdict]
    VERDICT_UNSPECIFIED: EpisodeLabel.Verdict
    SUCCESS: EpisodeLabel.Verdict
    FAILURE: EpisodeLabel.Verdict
    ABORT: EpisodeLabel.Verdict
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_SCORE_FIELD_NUMBER: _ClassVar[int]
    source: EpisodeLabel.Source
    verdict: EpisodeLabel.Verdict
    detector_score: float
    def __init__(self, source: _Optional[_Union[EpisodeLabel.Source, str]] = ..., verdict: _Optional[_Union[EpisodeLabel.Verdict, str]] = ..., detector_score: _Optional[float] = ...) -> None: ...

class Intervention(_message.Message):
    __slots__ = ("executed", "teleop")
    EXECUTED_FIELD_NUMBER: _ClassVar[int]
    TELEOP_FIELD_NUMBER: _ClassVar[int]
    executed: Tensor
    teleop: Tensor
    def __init__(self, executed: _Optional[_Union[Tensor, _Mapping]] = ..., teleop: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SafetyMarks(_message.Message):
    __slots__ = ("clamped_ticks", "limited_ticks", "held_ticks", "estop", "watchdog")
    CLAMPED_TICKS_FIELD_NUMBER: _ClassVar[int]
    LIMITED_TICKS_FIELD_NUMBER: _ClassVar[int]
    HELD_TICKS_FIELD_NUMBER: _ClassVar[int]
    ESTOP_FIELD_NUMBER: _ClassVar[int]
    WATCHDOG_FIELD_NUMBER: _ClassVar[int]
    clamped_ticks: int
    limited_ticks: int
    held_ticks: int
    estop: bool
    watchdog: bool
    def __init__(self, clamped_ticks: _Optional[int] = ..., limited_ticks: _Optional[int] = ..., held_ticks: _Optional[int] = ..., estop: _Optional[bool] = ..., watchdog: _Optional[bool] = ...) -> None: ...

class RolloutAck(_message.Message):
    __slots__ = ("sequence", "status")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[RolloutAck.Status]
        ACCEPTED: _ClassVar[RolloutAck.Status]
        DUPLICATE: _ClassVar[RolloutAck.Status]
    STATUS_UNSPECIFIED: RolloutAck.Status
    ACCEPTED: RolloutAck.Status
    DUPLICATE: RolloutAck.Status
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    status: RolloutAck.Status
    def __init__(self, sequence: _Optional[int] = ..., status: _Optional[_Union[RolloutAck.Status, str]] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("robot_id", "have_version")
    ROBOT_ID_FIELD_NUMBER: _ClassVar[int]
    HAVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    robot_id: str
    have_version: int
    def __init__(self, robot_id: _Optional[str] = ..., have_version: _Optional[int] = ...) -> None: ...

class PolicyUpdate(_message.Message):
    __slots__ = ("version", "weights", "manifest", "published_unix_s", "files", "trained_only", "frozen_sha256", "chunked", "chunk_bytes")
    class FilesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    TRAINED_ONLY_FIELD_NUMBER: _ClassVar[int]
    FROZEN_SHA256_FIELD_NUMBER: _ClassVar[int]
    CHUNKED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    version: int
    weights: bytes
    manifest: Manifest
    published_unix_s: float
    files: _containers.ScalarMap[str, bytes]
    trained_only: bool
    frozen_sha256: str
    chunked: bool
    chunk_bytes: int
    def __init__(self, version: _Optional[int] = ..., weights: _Optional[bytes] = ..., manifest: _Optional[_Union[Manifest, _Mapping]] = ..., published_unix_s: _Optional[float] = ..., files: _Optional[_Mapping[str, bytes]] = ..., trained_only: _Optional[bool] = ..., frozen_sha256: _Optional[str] = ..., chunked: _Optional[bool] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("policy_version", "artifacts")
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    policy_version: int
    artifacts: _containers.RepeatedCompositeFieldContainer[Artifact]
    def __init__(self, policy_version: _Optional[int] = ..., artifacts: _Optional[_Iterable[_Union[Artifact, _Mapping]]] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("name", "sha256", "size_bytes", "chunk_sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    size_bytes: int
    chunk_sha256: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., chunk_sha256: _Optional[_Iterable[str]] = ...) -> None: ...

class FetchArtifactRequest(_message.Message):
    __slots__ = ("robot_id", "version", "name", "offset")
    ROBOT_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    robot_id: str
    version: int
    name: str
    offset: int
    def __init__(self, robot_id: _Optional[str] = ..., version: _Optional[int] = ..., name: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("offset", "data", "sha256")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    sha256: str
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...
