"""Shared helpers for the Kubernetes and Prometheus checks: rendering with kustomize,
free ports, and real processes (the tidewatch binary, redis-server, Prometheus) that
are always stopped at the end of a test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
BINARY = REPO / "target" / "release" / "tidewatch"
# Readiness is polled (a signal exists: a port that answers); this only bounds a hang.
STARTUP_LIMIT_S = 60.0


def tool(name: str) -> str:
    """The path of a command-line tool the checks need, or a failure naming it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (.ci/run installs it)")
    return path


def kustomize(path: Path, *flags: str) -> list[dict]:
    """Renders a kustomization with `kubectl kustomize` and returns its objects."""
    out = subprocess.run(
        [tool("kubectl"), "kustomize", *flags, str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    """The objects of one kind (and name, if given)."""
    return [
        o
        for o in objects
        if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    """The single object of one kind (and name)."""
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, probe, limit_s: float = STARTUP_LIMIT_S, proc=None):
    """Polls `probe` until it returns a truthy value; fails after `limit_s`, or at
    once if `proc` exits meanwhile."""
    deadline = time.monotonic() + limit_s
    last_error = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode} while waiting")
        try:
            value = probe()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last_error = e
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what} (last error: {last_error})")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def http_post_json(url: str, body, headers: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(
        url,
        data=data,
        method="POST",
        headers={"content-type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class Processes:
    """Processes started by a test; all are stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.tmp
        )
        self.procs.append((name, proc))
        return proc

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self):
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def procs(tmp_path):
    p = Processes(tmp_path)
    yield p
    p.stop_all()


@pytest.fixture(scope="session")
def base() -> list[dict]:
    return kustomize(K8S)


@pytest.fixture(scope="session")
def minikube() -> list[dict]:
    return kustomize(K8S / "overlays" / "minikube")


@pytest.fixture(scope="session")
def redis_cluster() -> list[dict]:
    return kustomize(K8S / "overlays" / "redis-cluster")


GHZ_CONFIGS = ("ingest.json", "analyze.json", "watch-anomalies.json")


@pytest.fixture(scope="session")
def ghz_jobs() -> list[dict]:
    missing = [c for c in GHZ_CONFIGS if not (REPO / "ghz" / c).exists()]
    if missing:
        pytest.fail(f"ghz configs missing (the Rust SDK's ghz/ folder): {missing}")
    return kustomize(K8S / "ghz", "--load-restrictor=LoadRestrictionsNone")


def start_redis(procs: Processes) -> int:
    """A real redis-server on a free port, without persistence."""
    port = free_port()
    proc = procs.start(
        "redis",
        [tool("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no"],
    )
    wait_until("redis-server", lambda: port_open(port), proc=proc)
    return port


def server_env(config_map: dict, grpc_port: int, http_port: int, redis_port: int) -> dict:
    """The ConfigMap's settings as the pod gets them, with the addresses pointed at this
    machine: loopback ports instead of 0.0.0.0 (the admin listener's too, on a free
    port: `admin_port(env)`), the test's Redis instead of the in-cluster one. Every
    other value is the ConfigMap's own."""
    env = {k: v for k, v in os.environ.items() if k not in ("RUST_LOG",)}
    env.update(config_map["data"])
    env["GRPC_ADDR"] = f"127.0.0.1:{grpc_port}"
    env["LISTEN_ADDR"] = f"127.0.0.1:{http_port}"
    if "ADMIN_ADDR" in env:
        env["ADMIN_ADDR"] = f"127.0.0.1:{free_port()}"
    env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}"
    return env


def admin_port(env: dict) -> int | None:
    """The admin listener's port in `env`, if it sets one."""
    addr = env.get("ADMIN_ADDR")
    return int(addr.rsplit(":", 1)[1]) if addr else None


def start_server(procs: Processes, env: dict, grpc_port: int, http_port: int):
    """The real tidewatch binary; returns once /healthz answers 200 (on the admin
    listener when `env` has one, as the kubelet probes it) and gRPC listens."""
    if not BINARY.exists():
        pytest.fail(f"{BINARY} is missing: run `cargo build --release` first")
    proc = procs.start("tidewatch", [str(BINARY)], env=env)
    wait_until("tidewatch gRPC port", lambda: port_open(grpc_port), proc=proc)
    health_port = admin_port(env) or http_port
    wait_until(
        "tidewatch /healthz",
        lambda: http_get(f"http://127.0.0.1:{health_port}/healthz")[0] == 200,
        proc=proc,
    )
    return proc
