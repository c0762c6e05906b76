"""grpcio with gzip on against the real server (docs/api.md, "Compression"): compressed
requests on every method, compressed answers when ``GRPC_COMPRESSION`` allows them, and
a message that decompresses past ``MAX_MESSAGE_BYTES`` refused without being expanded.

grpcio compresses a message only when that makes it smaller, so the requests here are
batches of samples (what compresses); the ``grpc-encoding: gzip`` header it sends on
every call is what older servers refused with ``UNIMPLEMENTED``."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import tidewatch
from tidewatch import Sample
from tidewatch.v1 import telemetry_pb2 as pb
from tidewatch.v1 import telemetry_pb2_grpc as pb_grpc

from .conftest import Server

GZIP = [("grpc.default_compression_algorithm", grpc.Compression.Gzip)]


def start(env: dict[str, str]) -> Iterator[Server]:
    running = Server(env)
    running.start()
    yield running
    running.stop(signal.SIGKILL)


@pytest.fixture(params=["gzip", "off"], ids=["answers-gzip", "answers-plain"])
def compressing(request: pytest.FixtureRequest) -> Iterator[Server]:
    """A server whose answers are compressed (``GRPC_COMPRESSION=gzip``) or not."""
    yield from start({"GRPC_COMPRESSION": request.param})


@pytest.fixture
def small_messages() -> Iterator[Server]:
    yield from start({"MAX_MESSAGE_BYTES": str(64 * 1024)})


@pytest.fixture
async def channel(compressing: Server) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(compressing.addr, options=GZIP) as ch:
        yield ch


async def test_the_sdk_streams_gzip_in_batches(compressing: Server) -> None:
    async with tidewatch.connect(compressing.addr, channel_options=GZIP) as client:
        samples = [
            Sample(device_id=f"gz-{i % 5}", metrics={"rps": 400.0 + i % 9, "cpu": 0.5})
            for i in range(3000)
        ]
        verdicts = [v async for v in client.ingest(samples, batch_size=100)]
        assert len(verdicts) == 3000
        assert [v.device_id for v in verdicts] == [f"gz-{i % 5}" for i in range(3000)]
        assert not any(v.error or v.duplicate for v in verdicts)
        spike = [v async for v in client.ingest([Sample(device_id="gz-0", metrics={"rps": 9e6})])]
        assert spike[0].anomaly
        stats = await client.analyze("gz-0")
        assert stats.metrics[0].window_count > 0
        assert await client.health() == "SERVING"


async def test_every_method_takes_a_gzip_call(channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.TelemetryServiceStub(channel)
    gzip = grpc.Compression.Gzip
    request = pb.IngestRequest(
        samples=[
            pb.Sample(device_id=f"call-{i}", metrics={"rps": 10.0 * i, "cpu": 1.0})
            for i in range(100)
        ]
    )
    call = stub.Ingest(iter([request, request]), compression=gzip)
    responses = [r async for r in call]
    assert [len(r.verdicts) for r in responses] == [100, 100]
    assert responses[0].verdicts[99].device_id == "call-99"
    analyzed = await stub.Analyze(pb.AnalyzeRequest(device_id="call-7"), compression=gzip)
    assert analyzed.device_id == "call-7" and len(analyzed.metrics) == 2
    health = health_pb2_grpc.HealthStub(channel)
    checked = await health.Check(health_pb2.HealthCheckRequest(), compression=gzip)
    assert checked.status == health_pb2.HealthCheckResponse.SERVING
    watch = stub.WatchAnomalies(
        pb.WatchAnomaliesRequest(device_ids=["call-watch"]), compression=gzip
    )
    # The feed is open once it has sent its headers; an anomaly then arrives on it.
    await watch.initial_metadata()
    seed = [pb.IngestRequest(samples=[pb.Sample(device_id="call-watch", metrics={"rps": v})])
            for v in [1.0, 2.0, 1.0, 2.0, 1.0, 500.0]]
    [r async for r in stub.Ingest(iter(seed), compression=gzip)]
    seen = await watch.read()
    assert seen.verdict.device_id == "call-watch" and seen.verdict.anomaly
    watch.cancel()


async def test_a_message_that_decompresses_past_the_limit_is_refused(
    small_messages: Server,
) -> None:
    async with grpc.aio.insecure_channel(small_messages.addr, options=GZIP) as ch:
        stub = pb_grpc.TelemetryServiceStub(ch)
        first = pb.IngestRequest(samples=[pb.Sample(device_id="before", metrics={"rps": 1.0})])
        # 1 MiB of one letter: about a kilobyte once gzipped, 16 times the limit after.
        bomb = pb.IngestRequest(samples=[pb.Sample(device_id="a" * (1 << 20), metrics={"x": 1})])
        call = stub.Ingest(iter([first, bomb]), compression=grpc.Compression.Gzip)
        answered = []
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for response in call:
                answered.append(response)
        assert [len(r.verdicts) for r in answered] == [1]
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.details() == (
            "Error decompressing: size limit, of 65536 bytes, exceeded while "
            "decompressing message (MAX_MESSAGE_BYTES)"
        )
