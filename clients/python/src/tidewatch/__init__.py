"""tidewatch: clients for the tidewatch anomaly-detection service.

The asyncio client:

>>> async with tidewatch.connect("127.0.0.1:50051") as client:
...     async for verdict in client.ingest(samples):
...         print(verdict.anomaly)

The synchronous one (``tidewatch.sync``), for scripts and notebooks:

>>> with tidewatch.sync.connect("127.0.0.1:50051") as client:
...     for verdict in client.ingest(samples):
...         print(verdict.anomaly)

With TLS and a token (``tidewatch.tls`` makes the channel credentials; ``token`` is a
string or a callable returning a refreshed one):

>>> creds = tidewatch.tls(ca="ca.pem")
>>> async with tidewatch.connect("tidewatch.example.com:50051", credentials=creds,
...                              token=os.environ["TIDEWATCH_TOKEN"]) as client:
...     stats = await client.analyze("fleet-a/pump-1")

The messages (``Sample``, ``Verdict``, ...) are the generated protobuf classes of
``tidewatch.v1`` (``tidewatch.v1.telemetry_pb2``), re-exported here.
"""

from . import sync
from .auth import Token, tls
from .backoff import Backoff
from .client import AnomalyWatch, Client, IngestSession, connect
from .errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ProtocolError,
    ResourceExhaustedError,
    SessionClosedError,
    TidewatchError,
    UnauthenticatedError,
    UnavailableError,
)
from .v1.telemetry_pb2 import (
    AnalyzeResponse,
    DeleteDeviceResponse,
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
    "DeleteDeviceResponse",
    "DetectorConfig",
    "IngestRequest",
    "IngestResponse",
    "IngestSession",
    "InvalidArgumentError",
    "MetricStats",
    "MetricVerdict",
    "NotFoundError",
    "PermissionDeniedError",
    "ProtocolError",
    "ResourceExhaustedError",
    "Sample",
    "SessionClosedError",
    "Source",
    "TidewatchError",
    "Token",
    "UnauthenticatedError",
    "UnavailableError",
    "Verdict",
    "WatchAnomaliesResponse",
    "connect",
    "sync",
    "tls",
]

__version__ = "0.1.0"
