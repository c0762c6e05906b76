"""The clients against the real server with TLS and authentication on: certificates
made at test time (clients/test-certs.sh, the openssl CLI), an API key from a policy
file, mutual TLS whose certificate identity names a policy entry, and refusals."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import tidewatch
from tidewatch import Sample

from .conftest import REPO, Server

KEY = "tw_test_fleet_a_8d2f61c07a9e4b35b1c4f0e2d7a96c58"
IDENTITY = "spiffe://tidewatch.test/device/fleet-a-7"


class Secure:
    """A TLS server with the test policy, and the files a client needs."""

    def __init__(self, server: Server, certs: Path) -> None:
        self.server = server
        self.certs = certs
        # The server certificate names localhost, not 127.0.0.1's reverse.
        self.target = f"localhost:{server.port}"

    def pem(self, name: str) -> bytes:
        return (self.certs / name).read_bytes()


def _start(tmp_path: Path, mutual: bool) -> Iterator[Secure]:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl CLI is required to make the test certificates")
    subprocess.run(
        ["sh", str(REPO / "clients" / "test-certs.sh"), str(tmp_path), IDENTITY], check=True
    )
    policy = {
        "principals": [
            {
                "name": "fleet-a",
                "scopes": ["ingest", "analyze", "watch"],
                "devices": ["fleet-a/*"],
                "api_keys_sha256": [hashlib.sha256(KEY.encode()).hexdigest()],
            },
            {"name": IDENTITY, "scopes": ["ingest", "analyze"], "devices": ["fleet-a/*"]},
        ]
    }
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    env = {
        "TLS_CERT": str(tmp_path / "server.pem"),
        "TLS_KEY": str(tmp_path / "server.key"),
        "AUTH_POLICY": str(tmp_path / "policy.json"),
    }
    if mutual:
        env["TLS_CLIENT_CA"] = str(tmp_path / "ca.pem")
    server = Server(env)
    server.start()
    try:
        yield Secure(server, tmp_path)
    finally:
        server.stop(signal.SIGKILL)


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[Secure]:
    yield from _start(tmp_path, mutual=False)


@pytest.fixture
def mutual(tmp_path: Path) -> Iterator[Secure]:
    yield from _start(tmp_path, mutual=True)


def rps(device: str, value: float) -> Sample:
    return Sample(device_id=device, metrics={"rps": value})


async def test_api_key_over_tls(secure: Secure) -> None:
    creds = tidewatch.tls(ca=secure.certs / "ca.pem")
    async with tidewatch.connect(secure.target, credentials=creds, token=KEY) as client:
        # Every call kind carries the token: server streaming (watch) too.
        watch = client.watch_anomalies(device_ids=["fleet-a/pump-1"])
        await watch.ready()
        watch.cancel()
        verdicts = [v async for v in client.ingest([rps("fleet-a/pump-1", x) for x in (1, 2, 3)])]
        assert len(verdicts) == 3
        stats = await client.analyze("fleet-a/pump-1")
        assert stats.device_id == "fleet-a/pump-1"
        # Outside the namespace: refused without saying whether the device exists.
        with pytest.raises(tidewatch.PermissionDeniedError):
            await client.analyze("fleet-b/pump-1")


async def test_wrong_or_missing_token_is_unauthenticated(secure: Secure) -> None:
    creds = tidewatch.tls(ca=secure.pem("ca.pem"))
    async with tidewatch.connect(secure.target, credentials=creds, token="wrong") as client:
        with pytest.raises(tidewatch.UnauthenticatedError) as refused:
            await client.analyze("fleet-a/pump-1")
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(tidewatch.UnauthenticatedError):
            await client.watch_anomalies().ready()
        with pytest.raises(tidewatch.UnauthenticatedError):
            async for _ in client.ingest([rps("fleet-a/pump-1", 1.0)]):
                pass
    async with tidewatch.connect(secure.target, credentials=creds) as client:
        with pytest.raises(tidewatch.UnauthenticatedError):
            await client.analyze("fleet-a/pump-1")


async def test_token_callable_is_read_per_call(secure: Secure) -> None:
    current = {"token": "expired"}

    async def token() -> str:
        return current["token"]

    creds = tidewatch.tls(ca=secure.pem("ca.pem"))
    async with tidewatch.connect(secure.target, credentials=creds, token=token) as client:
        with pytest.raises(tidewatch.UnauthenticatedError):
            await client.analyze("fleet-a/none")
        current["token"] = KEY
        # Authenticated now: the device is simply unknown.
        with pytest.raises(tidewatch.NotFoundError):
            await client.analyze("fleet-a/none")


def test_sync_client_with_tls_and_token(secure: Secure) -> None:
    creds = tidewatch.tls(ca=secure.pem("ca.pem"))
    with tidewatch.sync.connect(secure.target, credentials=creds, token=lambda: KEY) as client:
        assert len(list(client.ingest([rps("fleet-a/pump-2", 5.0)]))) == 1
        assert client.analyze("fleet-a/pump-2").device_id == "fleet-a/pump-2"
    with tidewatch.sync.connect(secure.target, credentials=creds, token="wrong") as client:
        with pytest.raises(tidewatch.UnauthenticatedError):
            client.analyze("fleet-a/pump-2")


async def test_mutual_tls_identity_names_the_policy_entry(mutual: Secure) -> None:
    creds = tidewatch.tls(
        ca=mutual.pem("ca.pem"), cert=mutual.pem("client.pem"), key=mutual.pem("client.key")
    )
    async with tidewatch.connect(mutual.target, credentials=creds) as client:
        with pytest.raises(tidewatch.NotFoundError):
            await client.analyze("fleet-a/none")
        with pytest.raises(tidewatch.PermissionDeniedError):
            await client.analyze("fleet-b/none")
    # The same identity signed by a CA the server does not trust: no handshake.
    foreign = tidewatch.tls(
        ca=mutual.pem("ca.pem"), cert=mutual.pem("foreign.pem"), key=mutual.pem("foreign.key")
    )
    async with tidewatch.connect(mutual.target, credentials=foreign) as client:
        with pytest.raises(tidewatch.UnavailableError):
            await client.analyze("fleet-a/none", timeout=5)


def test_mutual_tls_needs_cert_and_key() -> None:
    with pytest.raises(ValueError, match="both cert and key"):
        tidewatch.tls(cert=b"x")
