"""Fixtures: the real tidewatch binary on free ports, started and stopped per test."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import tidewatch

REPO = Path(__file__).resolve().parents[3]
BINARY = Path(os.environ.get("TIDEWATCH_BIN", REPO / "target" / "release" / "tidewatch"))


class Server:
    """One tidewatch process; ``restart`` brings it back on the same gRPC port."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        #: Extra environment (TLS and policy settings), kept across restarts.
        self.env = env or {}
        self.process: subprocess.Popen[str] | None = None
        self.addr = ""
        self.port = 0

    def start(self, grpc_addr: str = "127.0.0.1:0") -> None:
        if not BINARY.exists():
            pytest.fail(f"{BINARY} is missing: run cargo build --release -p tidewatch-server")
        env = {
            **os.environ,
            "GRPC_ADDR": grpc_addr,
            "LISTEN_ADDR": "127.0.0.1:0",
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "info",
            **self.env,
        }
        env.pop("RUST_LOG", None)
        self.process = subprocess.Popen(
            [str(BINARY)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        found: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read_logs, args=(self.process, found), daemon=True).start()
        try:
            addr = found.get(timeout=30)
        except queue.Empty:
            addr = None
        if addr is None:
            self.process.kill()
            pytest.fail("tidewatch did not log `grpc listening`")
        self.addr = addr
        self.port = int(addr.rsplit(":", 1)[1])

    @staticmethod
    def _read_logs(process: subprocess.Popen[str], found: queue.Queue[str | None]) -> None:
        # Reads every line so the pipe never fills; reports the gRPC address once.
        assert process.stdout is not None
        reported = False
        for line in process.stdout:
            if reported:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            fields = entry.get("fields", entry)
            if fields.get("message") == "grpc listening":
                found.put(fields["grpc_addr"])
                reported = True
        if not reported:
            found.put(None)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def signal(self, sig: int) -> None:
        """Send ``sig`` without waiting (a SIGTERM'd server still answers in-flight samples)."""
        assert self.process is not None
        self.process.send_signal(sig)

    def restart_after_exit(self) -> None:
        """Wait for the process to exit, then start a new one on the same gRPC port."""
        assert self.process is not None
        self.process.wait(timeout=60)
        self.process = None
        self.start(f"127.0.0.1:{self.port}")


@pytest.fixture
def server() -> Iterator[Server]:
    running = Server()
    running.start()
    yield running
    running.stop(signal.SIGKILL)


@pytest.fixture
async def client(server: Server) -> AsyncIterator[tidewatch.Client]:
    async with tidewatch.connect(server.addr) as connected:
        yield connected
