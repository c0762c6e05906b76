"""A sample answered ``moved`` (its device is held by another replica of the server)
is sent again by the session until it is applied: the real binary on a real
``redis-server`` where a live "other replica" holds the device for 3 s."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

import tidewatch
from tidewatch import Sample

from .conftest import Server


def _cli(port: int, *args: str) -> str:
    return subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, check=False
    ).stdout.strip()


@pytest.fixture
def redis_port() -> Iterator[int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while _cli(port, "PING") != "PONG":
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield port
    finally:
        process.kill()
        process.wait()


async def test_moved_samples_are_sent_again_until_applied(
    redis_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    _cli(redis_port, "SET", "tidewatch:v1:replica:ghost", "1", "PX", "3000")
    _cli(redis_port, "SET", "{tidewatch:v1:device:held}:owner", "ghost")
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{redis_port}")
    server = Server()
    server.start()
    try:
        async with tidewatch.connect(server.addr) as client:
            samples = [Sample(device_id="held", metrics={"t": float(t)}) for t in (1, 2, 3)]
            verdicts = [v async for v in client.ingest(samples, batch_size=1)]
        assert [v.error for v in verdicts] == ["", "", ""]
        assert [v.metrics[0].value for v in verdicts] == [1.0, 2.0, 3.0]
    finally:
        server.stop(signal.SIGKILL)
