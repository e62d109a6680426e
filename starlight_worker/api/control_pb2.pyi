# Module references rewritten by scripts/gen-protos to live in starlight_worker.api.
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PullRequest(_message.Message):
    __slots__ = ("reference", "platform", "namespace", "wait", "no_ordering", "no_from")
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    NO_ORDERING_FIELD_NUMBER: _ClassVar[int]
    FROM_FIELD_NUMBER: _ClassVar[int]
    NO_FROM_FIELD_NUMBER: _ClassVar[int]
    reference: str
    platform: str
    namespace: str
    wait: bool
    no_ordering: bool
    no_from: bool
    def __init__(self, reference: _Optional[str] = ..., platform: _Optional[str] = ..., namespace: _Optional[str] = ..., wait: _Optional[bool] = ..., no_ordering: _Optional[bool] = ..., no_from: _Optional[bool] = ..., **kwargs) -> None: ...

class PullProgress(_message.Message):
    __slots__ = ("phase", "reference", "manifest_digest", "bundle_id", "bytes_received", "bytes_expected", "files_done", "files_total", "contents_local", "elapsed_seconds", "message", "resumes")
    class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PHASE_UNSPECIFIED: _ClassVar[PullProgress.Phase]
        REQUESTED: _ClassVar[PullProgress.Phase]
        READY: _ClassVar[PullProgress.Phase]
        CONTENTS: _ClassVar[PullProgress.Phase]
        COMPLETE: _ClassVar[PullProgress.Phase]
    PHASE_UNSPECIFIED: PullProgress.Phase
    REQUESTED: PullProgress.Phase
    READY: PullProgress.Phase
    CONTENTS: PullProgress.Phase
    COMPLETE: PullProgress.Phase
    PHASE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_EXPECTED_FIELD_NUMBER: _ClassVar[int]
    FILES_DONE_FIELD_NUMBER: _ClassVar[int]
    FILES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CONTENTS_LOCAL_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESUMES_FIELD_NUMBER: _ClassVar[int]
    phase: PullProgress.Phase
    reference: str
    manifest_digest: str
    bundle_id: str
    bytes_received: int
    bytes_expected: int
    files_done: int
    files_total: int
    contents_local: int
    elapsed_seconds: float
    message: str
    resumes: int
    def __init__(self, phase: _Optional[_Union[PullProgress.Phase, str]] = ..., reference: _Optional[str] = ..., manifest_digest: _Optional[str] = ..., bundle_id: _Optional[str] = ..., bytes_received: _Optional[int] = ..., bytes_expected: _Optional[int] = ..., files_done: _Optional[int] = ..., files_total: _Optional[int] = ..., contents_local: _Optional[int] = ..., elapsed_seconds: _Optional[float] = ..., message: _Optional[str] = ..., resumes: _Optional[int] = ..., **kwargs) -> None: ...

class ImagesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ImageInfo(_message.Message):
    __slots__ = ("reference", "manifest_digest", "platform", "namespace", "complete", "bytes_local", "bytes_total", "files_local", "files_total", "layers", "pulled_at")
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    BYTES_LOCAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FILES_LOCAL_FIELD_NUMBER: _ClassVar[int]
    FILES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    PULLED_AT_FIELD_NUMBER: _ClassVar[int]
    reference: str
    manifest_digest: str
    platform: str
    namespace: str
    complete: bool
    bytes_local: int
    bytes_total: int
    files_local: int
    files_total: int
    layers: int
    pulled_at: float
    def __init__(self, reference: _Optional[str] = ..., manifest_digest: _Optional[str] = ..., platform: _Optional[str] = ..., namespace: _Optional[str] = ..., complete: _Optional[bool] = ..., bytes_local: _Optional[int] = ..., bytes_total: _Optional[int] = ..., files_local: _Optional[int] = ..., files_total: _Optional[int] = ..., layers: _Optional[int] = ..., pulled_at: _Optional[float] = ...) -> None: ...

class ImagesResponse(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageInfo]
    def __init__(self, images: _Optional[_Iterable[_Union[ImageInfo, _Mapping]]] = ...) -> None: ...

class OptimizerRequest(_message.Message):
    __slots__ = ("enable", "group")
    ENABLE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    enable: bool
    group: str
    def __init__(self, enable: _Optional[bool] = ..., group: _Optional[str] = ...) -> None: ...

class OptimizerResponse(_message.Message):
    __slots__ = ("enabled", "group", "traces_pending")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    TRACES_PENDING_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    group: str
    traces_pending: int
    def __init__(self, enabled: _Optional[bool] = ..., group: _Optional[str] = ..., traces_pending: _Optional[int] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("proxy",)
    PROXY_FIELD_NUMBER: _ClassVar[int]
    proxy: str
    def __init__(self, proxy: _Optional[str] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("traces_sent", "traces_already_sent", "images", "rejected", "traces_pending")
    TRACES_SENT_FIELD_NUMBER: _ClassVar[int]
    TRACES_ALREADY_SENT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    TRACES_PENDING_FIELD_NUMBER: _ClassVar[int]
    traces_sent: int
    traces_already_sent: int
    images: _containers.RepeatedScalarFieldContainer[str]
    rejected: _containers.RepeatedScalarFieldContainer[str]
    traces_pending: int
    def __init__(self, traces_sent: _Optional[int] = ..., traces_already_sent: _Optional[int] = ..., images: _Optional[_Iterable[str]] = ..., rejected: _Optional[_Iterable[str]] = ..., traces_pending: _Optional[int] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ("version", "proxy", "rtt_min_ms", "rtt_avg_ms", "rtt_max_ms", "proxy_error")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROXY_FIELD_NUMBER: _ClassVar[int]
    RTT_MIN_MS_FIELD_NUMBER: _ClassVar[int]
    RTT_AVG_MS_FIELD_NUMBER: _ClassVar[int]
    RTT_MAX_MS_FIELD_NUMBER: _ClassVar[int]
    PROXY_ERROR_FIELD_NUMBER: _ClassVar[int]
    version: str
    proxy: str
    rtt_min_ms: float
    rtt_avg_ms: float
    rtt_max_ms: float
    proxy_error: str
    def __init__(self, version: _Optional[str] = ..., proxy: _Optional[str] = ..., rtt_min_ms: _Optional[float] = ..., rtt_avg_ms: _Optional[float] = ..., rtt_max_ms: _Optional[float] = ..., proxy_error: _Optional[str] = ...) -> None: ...

class ResetRequest(_message.Message):
    __slots__ = ("dry_run",)
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    def __init__(self, dry_run: _Optional[bool] = ...) -> None: ...

class ResetResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, removed: _Optional[_Iterable[str]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("version", "proxy", "root", "layers", "layers_complete", "pulls_active", "optimizer", "optimizer_group", "fuse_layers")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROXY_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    PULLS_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_GROUP_FIELD_NUMBER: _ClassVar[int]
    FUSE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    version: str
    proxy: str
    root: str
    layers: int
    layers_complete: int
    pulls_active: int
    optimizer: bool
    optimizer_group: str
    fuse_layers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[str] = ..., proxy: _Optional[str] = ..., root: _Optional[str] = ..., layers: _Optional[int] = ..., layers_complete: _Optional[int] = ..., pulls_active: _Optional[int] = ..., optimizer: _Optional[bool] = ..., optimizer_group: _Optional[str] = ..., fuse_layers: _Optional[_Iterable[str]] = ...) -> None: ...
