"""The synchronous client (``tidewatch.sync``) against the real tidewatch binary."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import tidewatch
from tidewatch import Sample

from .conftest import Server

SEED = [420.0, 430.0, 410.0, 440.0, 425.0, 900.0]


def rps(device: str, value: float) -> Sample:
    return Sample(device_id=device, metrics={"rps": value})


def test_constructing_starts_nothing() -> None:
    # No server listens here: a client that dialled or started a thread would show it.
    before = threading.active_count()
    client = tidewatch.sync.Client("127.0.0.1:1")
    session_client = tidewatch.Client("127.0.0.1:1")
    assert threading.active_count() == before
    assert client._client is None and session_client._channel is None
    client.close()


def test_ingest_analyze_health(server: Server) -> None:
    with tidewatch.sync.connect(server.addr) as client:
        assert client.health() == "SERVING"
        verdicts = list(client.ingest([rps("sync-seed", v) for v in SEED], batch_size=1))
        assert [v.anomaly for v in verdicts] == [False] * 5 + [True]
        assert verdicts[-1].metrics[0].z_score == pytest.approx(47.5)
        stats = client.analyze("sync-seed")
        assert stats.device_id == "sync-seed"
        assert stats.metrics[0].window_count == 6
        assert stats.metrics[0].last_value == 900.0 and stats.metrics[0].last_anomaly
        with pytest.raises(tidewatch.NotFoundError):
            client.analyze("sync-nobody")
        assert client.delete_device("sync-seed").deleted
        assert not client.delete_device("sync-seed").deleted
        with pytest.raises(tidewatch.NotFoundError):
            client.analyze("sync-seed")


def test_many_samples_in_order(server: Server) -> None:
    samples = [rps(f"sync-{i % 5}", float(i)) for i in range(5_000)]
    with tidewatch.sync.connect(server.addr) as client:
        verdicts = list(client.ingest(samples, batch_size=200))
    assert [v.metrics[0].value for v in verdicts] == [float(i) for i in range(5_000)]
    assert not any(v.error or v.duplicate for v in verdicts)


def test_slow_source_interleaves_with_verdicts(server: Server) -> None:
    # A source that waits between samples still gets each verdict before the next sample:
    # the samples are read on their own thread and the linger sends partial batches.
    seen_before: list[int] = []
    received: list[tidewatch.Verdict] = []

    def source():
        for i, value in enumerate(SEED):
            seen_before.append(len(received))
            yield rps("sync-slow", value)
            if i < len(SEED) - 1:
                deadline = time.monotonic() + 5
                while len(received) <= i and time.monotonic() < deadline:
                    time.sleep(0.005)

    with tidewatch.sync.connect(server.addr) as client:
        for verdict in client.ingest(source(), batch_size=100, linger=0.01):
            received.append(verdict)
    assert seen_before == list(range(len(SEED)))
    assert received[-1].anomaly


def test_session_send_close_iterate(server: Server) -> None:
    with tidewatch.sync.connect(server.addr) as client:
        with client.session(batch_size=2) as session:
            for value in SEED:
                session.send(rps("sync-session", value))
        verdicts = list(session)
        assert [v.anomaly for v in verdicts] == [False] * 5 + [True]
        assert session.streams_opened == 1 and session.resent == 0


def test_watch_sees_the_anomaly_then_cancel_ends_it(server: Server) -> None:
    with tidewatch.sync.connect(server.addr) as client:
        watch = client.watch_anomalies(device_ids=["sync-watch"])
        watch.ready()
        list(client.ingest([rps("sync-watch", v) for v in SEED]))
        events = iter(watch)
        event = next(events)
        assert event.verdict.device_id == "sync-watch"
        assert event.verdict.metrics[0].value == 900.0
        watch.cancel()
        assert list(events) == []


def test_errors_of_the_source_reach_the_caller(server: Server) -> None:
    def broken():
        yield rps("sync-broken", 1.0)
        raise ValueError("bad row")

    with tidewatch.sync.connect(server.addr) as client:
        with pytest.raises(ValueError, match="bad row"):
            list(client.ingest(broken()))


def test_works_inside_a_running_event_loop(server: Server) -> None:
    # A notebook cell runs inside an event loop: the sync client must not need this one.
    async def cell() -> list[bool]:
        with tidewatch.sync.connect(server.addr) as client:
            return [v.anomaly for v in client.ingest([rps("sync-loop", v) for v in SEED])]

    assert asyncio.run(cell()) == [False] * 5 + [True]


def test_unreachable_server_fails_fast_with_connect() -> None:
    client = tidewatch.sync.Client("127.0.0.1:1")
    with pytest.raises(tidewatch.UnavailableError):
        client.connect(timeout=0.5)
    client.close()
