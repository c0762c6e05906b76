"""tidewatch: clients for the tidewatch anomaly-detection service.

The asyncio client:

>>> async with tidewatch.connect("127.0.0.1:50051") as client:
...     async for verdict in client.ingest(samples):
...         print(verdict.anomaly)

The synchronous one (``tidewatch.sync``), for scripts and notebooks:

>>> with tidewatch.sync.connect("127.0.0.1:50051") as client:
...     for verdict in client.ingest(samples):
...         print(verdict.anomaly)

The messages (``Sample``, ``Verdict``, ...) are the generated protobuf classes of
``tidewatch.v1`` (``tidewatch.v1.telemetry_pb2``), re-exported here.
"""

from . import sync
from .backoff import Backoff
from .client import AnomalyWatch, Client, IngestSession, connect
from .errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    ProtocolError,
    ResourceExhaustedError,
    SessionClosedError,
    TidewatchError,
    UnavailableError,
)
from .v1.telemetry_pb2 import (
    AnalyzeResponse,
    DetectorConfig,
    IngestRequest,
    IngestResponse,
    MetricStats,
    MetricVerdict,
    Sample,
    Source,
    Verdict,
    WatchAnomaliesResponse,
)

__all__ = [
    "AnalyzeResponse",
    "AnomalyWatch",
    "Backoff",
    "Client",
    "DeadlineExceededError",
    "DetectorConfig",
    "IngestRequest",
    "IngestResponse",
    "IngestSession",
    "InvalidArgumentError",
    "MetricStats",
    "MetricVerdict",
    "NotFoundError",
    "ProtocolError",
    "ResourceExhaustedError",
    "Sample",
    "SessionClosedError",
    "Source",
    "TidewatchError",
    "UnavailableError",
    "Verdict",
    "WatchAnomaliesResponse",
    "connect",
    "sync",
]

__version__ = "0.1.0"
