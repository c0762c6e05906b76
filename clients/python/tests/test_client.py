"""The asyncio client against the real tidewatch binary."""

from __future__ import annotations

import asyncio
import math
import signal

import pytest

import tidewatch
from tidewatch import Sample

from .conftest import Server

SEED = [420.0, 430.0, 410.0, 440.0, 425.0, 900.0]


def rps(device: str, value: float) -> Sample:
    return Sample(device_id=device, metrics={"rps": value})


async def collect(client: tidewatch.Client, samples: list[Sample], **options: object) -> list:
    return [verdict async for verdict in client.ingest(samples, **options)]


async def test_seed_check(client: tidewatch.Client) -> None:
    verdicts = await collect(client, [rps("sensor-1", v) for v in SEED], batch_size=1)
    assert [v.anomaly for v in verdicts] == [False] * 5 + [True]
    last = verdicts[-1]
    assert last.device_id == "sensor-1"
    assert last.metrics[0].metric == "rps"
    assert last.metrics[0].z_score == pytest.approx(47.5)
    assert last.metrics[0].mean == pytest.approx(425.0)
    assert all(not v.error for v in verdicts)
    # Sequence numbers were assigned per device, increasing.
    seqs = [v.seq for v in verdicts]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and seqs[0] > 0


async def test_ten_thousand_samples_answered_in_order(client: tidewatch.Client) -> None:
    samples = [rps(f"dev-{i % 7}", float(i)) for i in range(10_000)]
    verdicts = await collect(client, samples, batch_size=250)
    assert len(verdicts) == 10_000
    assert [v.metrics[0].value for v in verdicts] == [float(i) for i in range(10_000)]
    assert [v.device_id for v in verdicts] == [f"dev-{i % 7}" for i in range(10_000)]
    assert not any(v.error or v.duplicate for v in verdicts)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
async def test_server_restarted_mid_session_every_sample_answered_once(
    server: Server, client: tidewatch.Client, sig: int
) -> None:
    total = 3_000
    backoff = tidewatch.Backoff(initial=0.05, max=0.5)
    session = client.session(batch_size=10, max_in_flight=8, backoff=backoff)
    received: list[tidewatch.Verdict] = []
    killed = asyncio.Event()
    restarted = asyncio.Event()

    async def restart() -> None:
        await asyncio.to_thread(server.restart_after_exit)
        restarted.set()

    async def consume() -> None:
        restarter = None
        async for verdict in session:
            received.append(verdict)
            if len(received) == 1_000:
                # Samples sent after the first thousand are still in flight now.
                server.signal(sig)
                killed.set()
                restarter = asyncio.create_task(restart())
        assert restarter is not None
        await restarter

    consumer = asyncio.create_task(consume())
    for i in range(total):
        if i == total // 2:
            # The second half goes out only once the server is gone.
            await killed.wait()
        await session.send(rps("restart-dev", float(i)))
    await session.close()
    await consumer

    assert restarted.is_set()
    assert session.streams_opened >= 2
    print(f"streams opened {session.streams_opened}, samples re-sent {session.resent}")
    assert len(received) == total
    assert [v.metrics[0].value for v in received] == [float(i) for i in range(total)]
    seqs = [v.seq for v in received]
    assert len(set(seqs)) == total and seqs == sorted(seqs)
    assert not any(v.error for v in received)


async def test_analyze_and_not_found(client: tidewatch.Client) -> None:
    await collect(client, [rps("sensor-a", v) for v in SEED])
    stats = await client.analyze("sensor-a")
    assert stats.device_id == "sensor-a"
    assert stats.source == tidewatch.Source.SOURCE_MEMORY
    assert stats.last_seq > 0
    (rps_stats,) = stats.metrics
    assert rps_stats.metric == "rps"
    assert rps_stats.window_count == 6
    assert rps_stats.last_value == 900.0
    assert rps_stats.last_anomaly
    assert rps_stats.anomalies_total == 1
    assert rps_stats.rolling_average == pytest.approx(sum(SEED) / 6)
    with pytest.raises(tidewatch.NotFoundError) as raised:
        await client.analyze("never-seen")
    assert raised.value.code is not None and raised.value.code.name == "NOT_FOUND"


async def test_delete_device(client: tidewatch.Client) -> None:
    await collect(client, [rps("to-delete", v) for v in SEED])
    deleted = await client.delete_device("to-delete")
    assert isinstance(deleted, tidewatch.DeleteDeviceResponse)
    assert (deleted.device_id, deleted.deleted) == ("to-delete", True)
    with pytest.raises(tidewatch.NotFoundError):
        await client.analyze("to-delete")
    assert not (await client.delete_device("to-delete")).deleted


async def test_watch_anomalies(client: tidewatch.Client) -> None:
    every = client.watch_anomalies()
    only_b = client.watch_anomalies(device_ids=["watch-b"], metrics=["rps"])
    await every.ready()
    await only_b.ready()
    await collect(client, [rps("watch-a", v) for v in SEED])
    await collect(client, [rps("watch-b", v) for v in SEED])
    events_all = aiter(every)
    first = await anext(events_all)
    second = await anext(events_all)
    assert [first.verdict.device_id, second.verdict.device_id] == ["watch-a", "watch-b"]
    assert first.verdict.anomaly and first.missed == 0
    assert first.time.seconds > 0
    # The filtered watcher never saw watch-a's anomaly: its first event is watch-b's.
    event_b = await anext(aiter(only_b))
    assert event_b.verdict.device_id == "watch-b"
    assert event_b.verdict.metrics[0].value == 900.0
    every.cancel()
    only_b.cancel()


async def test_watch_ends_unavailable_at_shutdown(server: Server, client: tidewatch.Client) -> None:
    watch = client.watch_anomalies()
    await watch.ready()
    server.stop(signal.SIGTERM)
    with pytest.raises(tidewatch.UnavailableError):
        async for _ in watch:
            pass


async def test_bad_sample_gets_its_own_error(client: tidewatch.Client) -> None:
    samples = [
        Sample(device_id="bad-1", metrics={"cpu": 1.0}),
        Sample(device_id="bad-1", metrics={"cpu": math.nan}),
        Sample(device_id="bad-1", metrics={}),
        Sample(device_id="bad-1", metrics={"cpu": 2.0}),
    ]
    verdicts = await collect(client, samples, batch_size=4)
    assert [v.error == "" for v in verdicts] == [True, False, False, True]
    assert verdicts[1].error == 'invalid_value: metric "cpu" is NaN'
    assert verdicts[2].error.startswith("no_metrics")
    stats = await client.analyze("bad-1")
    assert stats.metrics[0].window_count == 2


async def test_detector_config_is_sent_with_the_first_message(client: tidewatch.Client) -> None:
    detector = tidewatch.DetectorConfig(name="zscore", threshold=2.0)
    verdicts = await collect(client, [rps("det-1", v) for v in SEED], detector=detector)
    assert [v.anomaly for v in verdicts] == [False] * 5 + [True]


async def test_health(server: Server, client: tidewatch.Client) -> None:
    assert await client.health() == "SERVING"
    assert await client.health("tidewatch.v1.TelemetryService") == "SERVING"
    with pytest.raises(tidewatch.NotFoundError):
        await client.health("no.such.Service")
    server.stop(signal.SIGKILL)
    with pytest.raises(tidewatch.UnavailableError):
        await client.health(timeout=5)


async def test_session_gives_up_after_max_attempts(server: Server) -> None:
    server.stop(signal.SIGKILL)
    backoff = tidewatch.Backoff(initial=0.01, max=0.05, max_attempts=3)
    async with tidewatch.connect(server.addr, reconnect_backoff=backoff) as client:
        with pytest.raises(tidewatch.UnavailableError):
            await collect(client, [rps("x", 1.0)], backoff=backoff)


async def test_closed_session_rejects_samples(client: tidewatch.Client) -> None:
    session = client.session()
    await session.send(rps("closed-1", 1.0))
    await session.close()
    assert [v.metrics[0].value async for v in session] == [1.0]
    with pytest.raises(tidewatch.SessionClosedError):
        await session.send(rps("closed-1", 2.0))


def test_backoff_grows_within_bounds() -> None:
    backoff = tidewatch.Backoff(initial=0.1, max=1.0, multiplier=2.0)
    assert [backoff.cap(n) for n in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    for attempt in range(6):
        delay = backoff.delay(attempt)
        assert backoff.cap(attempt) / 2 <= delay <= backoff.cap(attempt)


async def test_too_large_batch_fails_the_session_with_invalid_argument(
    client: tidewatch.Client,
) -> None:
    samples = [rps("big-1", float(i)) for i in range(10_001)]
    with pytest.raises(tidewatch.InvalidArgumentError):
        await collect(client, samples, batch_size=10_001)


async def test_stopping_early_releases_a_blocked_producer(client: tidewatch.Client) -> None:
    seen = 0
    verdicts = client.ingest((rps("early-1", float(i)) for i in range(5_000)), batch_size=5,
                             max_in_flight=1)
    async for _ in verdicts:
        seen += 1
        if seen == 10:
            break
    await verdicts.aclose()  # type: ignore[attr-defined]
    session = client.session(batch_size=1, max_in_flight=1)
    await session.send(rps("early-2", 1.0))
    blocked = asyncio.create_task(session.send(rps("early-2", 2.0)))
    await session.abort()
    with pytest.raises(tidewatch.SessionClosedError):
        await blocked
