import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Source(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOURCE_UNSPECIFIED: _ClassVar[Source]
    SOURCE_MEMORY: _ClassVar[Source]
    SOURCE_SNAPSHOT: _ClassVar[Source]
SOURCE_UNSPECIFIED: Source
SOURCE_MEMORY: Source
SOURCE_SNAPSHOT: Source

class Sample(_message.Message):
    __slots__ = ("device_id", "time", "metrics", "seq")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    time: _timestamp_pb2.Timestamp
    metrics: _containers.ScalarMap[str, float]
    seq: int
    def __init__(self, device_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., seq: _Optional[int] = ...) -> None: ...

class IngestRequest(_message.Message):
    __slots__ = ("samples", "detector")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    detector: DetectorConfig
    def __init__(self, samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ..., detector: _Optional[_Union[DetectorConfig, _Mapping]] = ...) -> None: ...

class DetectorConfig(_message.Message):
    __slots__ = ("name", "window_size", "threshold", "min_samples")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SIZE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MIN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    name: str
    window_size: int
    threshold: float
    min_samples: int
    def __init__(self, name: _Optional[str] = ..., window_size: _Optional[int] = ..., threshold: _Optional[float] = ..., min_samples: _Optional[int] = ...) -> None: ...

class IngestResponse(_message.Message):
    __slots__ = ("verdicts",)
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    verdicts: _containers.RepeatedCompositeFieldContainer[Verdict]
    def __init__(self, verdicts: _Optional[_Iterable[_Union[Verdict, _Mapping]]] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("device_id", "seq", "anomaly", "metrics", "duplicate", "error", "alert", "score")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ANOMALY_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ALERT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    seq: int
    anomaly: bool
    metrics: _containers.RepeatedCompositeFieldContainer[MetricVerdict]
    duplicate: bool
    error: str
    alert: bool
    score: float
    def __init__(self, device_id: _Optional[str] = ..., seq: _Optional[int] = ..., anomaly: _Optional[bool] = ..., metrics: _Optional[_Iterable[_Union[MetricVerdict, _Mapping]]] = ..., duplicate: _Optional[bool] = ..., error: _Optional[str] = ..., alert: _Optional[bool] = ..., score: _Optional[float] = ...) -> None: ...

class MetricVerdict(_message.Message):
    __slots__ = ("metric", "value", "mean", "stddev", "z_score", "anomaly", "window_count", "score", "alert")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STDDEV_FIELD_NUMBER: _ClassVar[int]
    Z_SCORE_FIELD_NUMBER: _ClassVar[int]
    ANOMALY_FIELD_NUMBER: _ClassVar[int]
    WINDOW_COUNT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ALERT_FIELD_NUMBER: _ClassVar[int]
    metric: str
    value: float
    mean: float
    stddev: float
    z_score: float
    anomaly: bool
    window_count: int
    score: float
    alert: bool
    def __init__(self, metric: _Optional[str] = ..., value: _Optional[float] = ..., mean: _Optional[float] = ..., stddev: _Optional[float] = ..., z_score: _Optional[float] = ..., anomaly: _Optional[bool] = ..., window_count: _Optional[int] = ..., score: _Optional[float] = ..., alert: _Optional[bool] = ...) -> None: ...

class AnalyzeRequest(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class AnalyzeResponse(_message.Message):
    __slots__ = ("device_id", "metrics", "updated_at", "source", "last_seq")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    metrics: _containers.RepeatedCompositeFieldContainer[MetricStats]
    updated_at: _timestamp_pb2.Timestamp
    source: Source
    last_seq: int
    def __init__(self, device_id: _Optional[str] = ..., metrics: _Optional[_Iterable[_Union[MetricStats, _Mapping]]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[_Union[Source, str]] = ..., last_seq: _Optional[int] = ...) -> None: ...

class MetricStats(_message.Message):
    __slots__ = ("metric", "rolling_average", "stddev", "window_count", "last_value", "last_z_score", "last_anomaly", "anomalies_total")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    ROLLING_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    STDDEV_FIELD_NUMBER: _ClassVar[int]
    WINDOW_COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_VALUE_FIELD_NUMBER: _ClassVar[int]
    LAST_Z_SCORE_FIELD_NUMBER: _ClassVar[int]
    LAST_ANOMALY_FIELD_NUMBER: _ClassVar[int]
    ANOMALIES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    metric: str
    rolling_average: float
    stddev: float
    window_count: int
    last_value: float
    last_z_score: float
    last_anomaly: bool
    anomalies_total: int
    def __init__(self, metric: _Optional[str] = ..., rolling_average: _Optional[float] = ..., stddev: _Optional[float] = ..., window_count: _Optional[int] = ..., last_value: _Optional[float] = ..., last_z_score: _Optional[float] = ..., last_anomaly: _Optional[bool] = ..., anomalies_total: _Optional[int] = ...) -> None: ...

class DeleteDeviceRequest(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class DeleteDeviceResponse(_message.Message):
    __slots__ = ("device_id", "deleted")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    deleted: bool
    def __init__(self, device_id: _Optional[str] = ..., deleted: _Optional[bool] = ...) -> None: ...

class WatchAnomaliesRequest(_message.Message):
    __slots__ = ("device_ids", "metrics")
    DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    device_ids: _containers.RepeatedScalarFieldContainer[str]
    metrics: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, device_ids: _Optional[_Iterable[str]] = ..., metrics: _Optional[_Iterable[str]] = ...) -> None: ...

class WatchAnomaliesResponse(_message.Message):
    __slots__ = ("verdict", "missed", "time")
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    MISSED_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    verdict: Verdict
    missed: int
    time: _timestamp_pb2.Timestamp
    def __init__(self, verdict: _Optional[_Union[Verdict, _Mapping]] = ..., missed: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
