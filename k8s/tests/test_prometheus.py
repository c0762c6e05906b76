"""End to end: the real server (with the ConfigMap's settings and a real Redis), a real
Prometheus scraping its /metrics every second with the PrometheusRule's groups loaded,
traffic with anomalies over gRPC (grpcurl) and HTTP; then, through Prometheus's HTTP
API, every rule evaluates without error, the alerts are in the state the traffic
calls for, and every PromQL expression of every dashboard returns data."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse

import pytest
import yaml
from conftest import (
    Processes,
    admin_port,
    find,
    free_port,
    http_get,
    http_post_json,
    one,
    server_env,
    start_redis,
    start_server,
    tool,
    wait_until,
)

# Grafana's interval variables, replaced by a concrete range: the whole test fits in it.
GRAFANA_INTERVALS = ("$__rate_interval", "$__interval", "$__range")
CONCRETE_RANGE = "5m"
DEVICES = [f"e2e-{i}" for i in range(4)]
NORMAL = [420.0, 430.0, 410.0, 440.0, 425.0, 435.0, 415.0, 428.0]
SPIKES = [900.0, 5.0, 1200.0]


def grpc_messages(devices: list[str]) -> list[dict]:
    """One Ingest message per sample: an ordinary window, then spikes, per device."""
    messages = []
    for device in devices:
        for i, value in enumerate(NORMAL + SPIKES):
            messages.append({"samples": [{
                "deviceId": device, "seq": str(i + 1),
                "metrics": {"rps": value, "cpu": 50.0 + (i % 3)},
            }]})
    return messages


def grpcurl(grpc_port: int, method: str, data: str, *extra: str, check=True):
    return subprocess.run(
        [tool("grpcurl"), "-plaintext", *extra, "-d", data,
         f"127.0.0.1:{grpc_port}", f"tidewatch.v1.TelemetryService/{method}"],
        capture_output=True, text=True, timeout=60, check=check,
    )


def drive_traffic(grpc_port: int, http_port: int, devices: list[str], seen: dict):
    """Sends the traffic and adds what the clients saw to `seen`: samples and anomalies
    per transport."""
    # A watcher is open while the anomalies happen (it ends at its -max-time).
    watcher = subprocess.Popen(
        [tool("grpcurl"), "-plaintext", "-max-time", "5", "-d", "{}",
         f"127.0.0.1:{grpc_port}", "tidewatch.v1.TelemetryService/WatchAnomalies"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        stream = "\n".join(json.dumps(m) for m in grpc_messages(devices))
        out = grpcurl(grpc_port, "Ingest", stream + "\n").stdout
        decoder = json.JSONDecoder()
        text = out.strip()
        pos = 0
        while pos < len(text):
            response, end = decoder.raw_decode(text, pos)
            pos = end
            while pos < len(text) and text[pos].isspace():
                pos += 1
            for verdict in response.get("verdicts", []):
                assert not verdict.get("error"), verdict
                seen["grpc"][0] += 1
                seen["grpc"][1] += bool(verdict.get("anomaly"))
        for device in devices:
            grpcurl(grpc_port, "Analyze", json.dumps({"deviceId": device}))
        # The same over HTTP, in the flat shape, with the routing header.
        for device in devices:
            http_device = f"{device}-http"
            for i, value in enumerate(NORMAL + SPIKES):
                body = {"device_id": http_device, "rps": value, "cpu": 40.0 + (i % 2)}
                status, answer = http_post_json(
                    f"http://127.0.0.1:{http_port}/ingest", body,
                    headers={"x-device-id": http_device})
                assert status == 200, answer
                for verdict in answer["verdicts"]:
                    seen["http"][0] += 1
                    seen["http"][1] += bool(verdict.get("anomaly"))
            status, _ = http_get(
                f"http://127.0.0.1:{http_port}/analyze?device_id={http_device}")
            assert status == 200
    finally:
        watcher.wait(timeout=30)


class Prometheus:
    """A real Prometheus (the Debian package's binary) on a free port."""

    def __init__(self, procs: Processes, target_port: int, rules_path):
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(rules_path)],
            "scrape_configs": [{
                "job_name": "tidewatch",
                "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
            }],
        }
        config_path = procs.tmp / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.proc = procs.start("prometheus", [
            tool("prometheus"),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={procs.tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ])
        wait_until("prometheus /-/ready",
                   lambda: http_get(self.url("/-/ready"))[0] == 200, proc=self.proc)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def api(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params)
        status, body = http_get(self.url(f"/api/v1/{path}?{query}"))
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", (path, params, answer)
        return answer["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None


def dashboard_queries(base: list[dict]) -> list[tuple[str, str, str]]:
    """(dashboard, panel, expression) for every target of every panel, rows included,
    and for the template variables' metrics, with Grafana's variables made concrete."""
    queries = []
    for cm in find(base, "ConfigMap"):
        if cm["metadata"].get("labels", {}).get("grafana_dashboard") != "1":
            continue
        for key, text in cm["data"].items():
            board = json.loads(text)
            variables = {v["name"]: v for v in board.get("templating", {}).get("list", [])}

            def concrete(expr: str) -> str:
                for name in GRAFANA_INTERVALS:
                    expr = expr.replace(name, CONCRETE_RANGE)
                for name, var in variables.items():
                    value = var.get("allValue") or ".*"
                    expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
                assert "$" not in expr, f"unreplaced variable in {expr}"
                return expr

            def walk(panels):
                for panel in panels:
                    walk(panel.get("panels", []))
                    for target in panel.get("targets", []):
                        queries.append((key, panel["title"], concrete(target["expr"])))

            walk(board["panels"])
            for var in variables.values():
                if var["type"] == "query":
                    q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
                    metric = re.fullmatch(r"label_values\((\w+),\s*\w+\)", q)
                    assert metric, q
                    queries.append((key, f"variable {var['name']}", metric.group(1)))
    assert queries
    return queries


def test_rules_and_dashboards_against_real_prometheus(base, procs, tmp_path):
    deployment = one(base, "Deployment", "tidewatch")
    config_name = deployment["spec"]["template"]["spec"]["containers"][0][
        "envFrom"][0]["configMapRef"]["name"]
    config = one(base, "ConfigMap", config_name)
    rules_path = tmp_path / "tidewatch.rules.yaml"
    rules_path.write_text(yaml.safe_dump(one(base, "PrometheusRule")["spec"]))

    redis_port = start_redis(procs)
    grpc_port, http_port = free_port(), free_port()
    env = server_env(config, grpc_port, http_port, redis_port)
    start_server(procs, env, grpc_port, http_port)
    # The ServiceMonitor's port: the admin listener.
    prom = Prometheus(procs, admin_port(env) or http_port, rules_path)
    # The target is up before any traffic, so every counter starts from a scrape at 0.
    wait_until("first scrape", lambda: prom.scalar('up{job="tidewatch"}') == 1.0)

    # Histogram series are born with their first observation, and a series' first
    # scraped value is no increase to rate(): a first round of traffic creates them,
    # the second is what the dashboards show.
    seen = {"grpc": [0, 0], "http": [0, 0]}
    drive_traffic(grpc_port, http_port, ["e2e-warmup"], seen)
    for series in ("tidewatch_ingest_message_duration_seconds_count",
                   'rpc_server_call_duration_seconds_count{rpc_method="Analyze"}',
                   'http_server_request_duration_seconds_count{http_route="/ingest"}',
                   "tidewatch_snapshot_flush_duration_seconds_count"):
        wait_until(f"{series} scraped", lambda s=series: prom.query(s))
    drive_traffic(grpc_port, http_port, DEVICES, seen)
    for transport, (samples, anomalies) in seen.items():
        assert samples > 0 and anomalies > 0, (transport, seen)

    # Prometheus has scraped everything the clients were answered (counters are exact).
    for transport, (samples, anomalies) in seen.items():
        wait_until(f"{transport} samples scraped", lambda t=transport, n=samples: prom.scalar(
            f'sum(tidewatch_samples_total{{transport="{t}"}})') == n)
        assert prom.scalar(
            f'sum(tidewatch_anomalies_total{{transport="{transport}"}})') == anomalies
    wait_until("a snapshot flush scraped",
               lambda: (prom.scalar("sum(tidewatch_snapshot_writes_total)") or 0) > 0)
    # Rules are evaluated after that scrape (evaluation_interval 1s).
    wait_until("rules evaluated on the traffic", lambda: (prom.scalar(
        "tidewatch:anomaly_share:ratio_rate5m") or 0) > 0)

    groups = prom.api("rules")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert len(rules) == 9, sorted(rules)
    for name, rule in rules.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
        assert not rule.get("lastError"), (name, rule["lastError"])
    # The traffic is a quarter anomalies (base threshold 5 %): HighAnomalyRate is on its
    # way (pending for 5 m); the target is up, nothing failed, nothing was shed.
    assert rules["HighAnomalyRate"]["state"] in ("pending", "firing")
    for name in ("TidewatchDown", "SnapshotFailing", "LoadShedding"):
        assert rules[name]["state"] == "inactive", (name, rules[name])

    empty = []
    for board, panel, expr in dashboard_queries(base):
        result = prom.query(expr)
        values = [float(r["value"][1]) for r in result]
        if not result or all(v != v for v in values):  # no series, or all NaN
            empty.append(f"{board} / {panel}: {expr} -> {result}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
