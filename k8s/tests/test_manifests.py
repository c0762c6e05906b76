"""The Kubernetes manifests, checked offline: kustomize renders the base, the minikube
overlay and the ghz Jobs; kubernetes-validate --strict accepts every built-in object
for a current Kubernetes; the CRD objects and the wiring between objects (selectors,
ports, probes, the ConfigMap) are consistent; the ConfigMap's settings are ones the
real binary accepts, and it starts and serves with them."""

from __future__ import annotations

import copy
import json
import re
import signal
import subprocess

import pytest
import yaml
from conftest import (
    BINARY,
    K8S,
    REPO,
    find,
    free_port,
    one,
    server_env,
    start_redis,
    start_server,
    tool,
)

# The newest schema set kubernetes-validate ships (minikube's default is close to it).
KUBERNETES_VERSION = "1.37.0"
CRD_GROUPS = ("monitoring.coreos.com/",)
SHUTDOWN_TIMEOUT_DEFAULT_S = 20


def parse_duration_s(value: str) -> float:
    """The seconds of a humantime-style duration the server accepts (`20s`, `5m`)."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", value):
        total += float(number) * units[unit]
    assert total > 0 or value.strip() == "0", f"unparsed duration {value!r}"
    return total


@pytest.mark.parametrize("name", ["base", "minikube", "ghz_jobs"])
def test_builtin_objects_validate_strictly(name, request, tmp_path):
    objects = request.getfixturevalue(name)
    builtin = [o for o in objects if not o["apiVersion"].startswith(CRD_GROUPS)]
    assert builtin, "nothing rendered"
    files = []
    for i, obj in enumerate(builtin):
        path = tmp_path / f"{i:02d}-{obj['kind']}-{obj['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(obj))
        files.append(str(path))
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--no-warn",
         "-k", KUBERNETES_VERSION, *files],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed for resource ") == len(files), result.stdout


def test_strict_validation_rejects_an_unknown_field(base, tmp_path):
    # The validator really is strict: a misspelt probe field fails.
    deploy = copy.deepcopy(one(base, "Deployment", "tidewatch"))
    deploy["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    path = tmp_path / "deployment.yaml"
    path.write_text(yaml.safe_dump(deploy))
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--no-warn", "-k", KUBERNETES_VERSION,
         str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "periodSecond" in result.stdout + result.stderr


def test_base_has_every_part(base):
    kinds = sorted({o["kind"] for o in base})
    assert kinds == sorted([
        "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Ingress", "Namespace",
        "PodDisruptionBudget", "PrometheusRule", "Service", "ServiceAccount",
        "ServiceMonitor", "StatefulSet",
    ])
    for obj in base:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "tidewatch", obj["metadata"]


def test_deployment_wiring(base):
    deploy = one(base, "Deployment", "tidewatch")
    spec = deploy["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["replicas"] == 2
    # Probes: native gRPC readiness on the service name, HTTP liveness, a startup probe.
    assert container["readinessProbe"]["grpc"] == {
        "port": 50051, "service": "tidewatch.v1.TelemetryService"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "startupProbe" in container
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "http": 8080}
    # The ConfigMap it reads is the generated one, and binds the ports declared here.
    (env_from,) = container["envFrom"]
    config = one(base, "ConfigMap", env_from["configMapRef"]["name"])["data"]
    assert config["GRPC_ADDR"] == f"0.0.0.0:{ports['grpc']}"
    assert config["LISTEN_ADDR"] == f"0.0.0.0:{ports['http']}"
    assert parse_duration_s(config["MAX_CONNECTION_AGE"]) > 0
    redis_host = re.fullmatch(r"redis://([a-z0-9-]+):6379", config["REDIS_URL"])
    assert redis_host, config["REDIS_URL"]
    one(base, "Service", redis_host.group(1))
    # The kubelet waits longer than the whole drain (SHUTDOWN_DELAY is part of it).
    shutdown = parse_duration_s(config.get("SHUTDOWN_TIMEOUT", f"{SHUTDOWN_TIMEOUT_DEFAULT_S}s"))
    assert pod["terminationGracePeriodSeconds"] > shutdown
    assert parse_duration_s(config.get("SHUTDOWN_DELAY", "0")) < shutdown
    assert "lifecycle" not in container  # no preStop hook: the delay is the server's
    # Non-root, read-only, no capabilities, spread over nodes.
    sc = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert "kubernetes.io/hostname" in keys
    selector = spec["selector"]["matchLabels"]
    assert selector.items() <= spec["template"]["metadata"]["labels"].items()


def test_services_ingress_hpa_pdb(base):
    deploy = one(base, "Deployment", "tidewatch")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    main = one(base, "Service", "tidewatch")
    headless = one(base, "Service", "tidewatch-headless")
    assert headless["spec"]["clusterIP"] == "None"
    for svc in (main, headless):
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        by_name = {p["name"]: p for p in svc["spec"]["ports"]}
        assert set(by_name) == {"grpc", "http"}
        assert by_name["grpc"]["appProtocol"] == "kubernetes.io/h2c"
        assert by_name["http"]["appProtocol"] == "http"
    grpc_ing = one(base, "Ingress", "tidewatch-grpc")
    http_ing = one(base, "Ingress", "tidewatch-http")
    annotations = grpc_ing["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    assert http_ing["metadata"]["annotations"][
        "nginx.ingress.kubernetes.io/upstream-hash-by"] == "$http_x_device_id"
    for ing, port in ((grpc_ing, "grpc"), (http_ing, "http")):
        assert ing["spec"]["ingressClassName"] == "nginx"
        for rule in ing["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert (backend["name"], backend["port"]["name"]) == ("tidewatch", port)
    hpa = one(base, "HorizontalPodAutoscaler", "tidewatch")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "tidewatch"
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 5)
    (metric,) = hpa["metrics"]
    assert metric["resource"] == {
        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 60
    pdb = one(base, "PodDisruptionBudget", "tidewatch")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    redis = one(base, "StatefulSet", "redis")
    assert redis["spec"]["serviceName"] == "redis"
    # Snapshots must never be evicted silently, and the memory must fit maxmemory.
    server = next(c for c in redis["spec"]["template"]["spec"]["containers"]
                  if c["name"] == "redis")
    args = server["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    maxmemory = args[args.index("--maxmemory") + 1]
    assert maxmemory.endswith("mb"), maxmemory
    limit = server["resources"]["limits"]["memory"]
    assert limit.endswith("Gi"), limit
    assert int(maxmemory[:-2]) * 1.5 <= int(limit[:-2]) * 1024, (maxmemory, limit)
    (config,) = [c["data"] for c in find(base, "ConfigMap") if "MAX_DEVICES" in c["data"]]
    devices = int(config["MAX_DEVICES"])
    # 1,173 bytes per device with 2 metrics x 50 values (the manifest's comment).
    assert devices * 1173 <= int(maxmemory[:-2]) * 1e6 * 0.8, (devices, maxmemory)


def test_monitoring_objects(base):
    monitor = one(base, "ServiceMonitor", "tidewatch")
    selector = monitor["spec"]["selector"]["matchLabels"]
    # Exactly one Service is scraped (not the headless one too: each pod once).
    scraped = [s for s in find(base, "Service")
               if selector.items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in scraped] == ["tidewatch"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in scraped[0]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    rule = one(base, "PrometheusRule", "tidewatch")
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == {"HighAnomalyRate", "TidewatchDown", "HighIngestLatency",
                      "SnapshotFailing", "LoadShedding", "RedisMemoryNearlyFull"}
    for obj in (monitor, rule):
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_dashboards_are_sidecar_configmaps(base):
    dashboards = [c for c in find(base, "ConfigMap")
                  if c["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert len(dashboards) == 2
    uids = set()
    for cm in dashboards:
        ((key, text),) = cm["data"].items()
        assert key.endswith(".json")
        board = json.loads(text)
        uids.add(board["uid"])
        assert board["panels"], key
    assert len(uids) == 2


def test_minikube_overlay(minikube):
    deploy = one(minikube, "Deployment", "tidewatch")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "tidewatch:dev"
    assert container["imagePullPolicy"] == "Never"
    hosts = {r["host"] for i in find(minikube, "Ingress") for r in i["spec"]["rules"]}
    assert hosts == {"tidewatch.local", "grpc.tidewatch.local"}
    rule = one(minikube, "PrometheusRule", "tidewatch")
    threshold = rule["spec"]["groups"][0]["rules"][0]
    assert threshold == {"record": "tidewatch:anomaly_share:threshold", "expr": "vector(0.10)"}


def test_ghz_jobs(ghz_jobs):
    config = one(ghz_jobs, "ConfigMap")
    proto = (REPO / "proto" / "tidewatch" / "v1" / "telemetry.proto").read_text()
    assert config["data"]["telemetry.proto"] == proto
    jobs = find(ghz_jobs, "Job")
    assert {j["metadata"]["name"] for j in jobs} == {
        "ghz-ingest", "ghz-analyze", "ghz-watch-anomalies"}
    for job in jobs:
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"].startswith("ghcr.io/bojand/ghz:")
        # Distroless: no shell, no command override, flags only.
        assert "command" not in container
        args = container["args"]
        config_arg = next(a for a in args if a.startswith("--config="))
        key = config_arg.removeprefix("--config=/ghz/")
        assert key in config["data"], key
        # The mounted config is the repository's own file, verbatim.
        assert config["data"][key] == (REPO / "ghz" / key).read_text()
        assert "--proto=/ghz/telemetry.proto" in args
        assert "--import-paths=/ghz" in args
        assert "--format=json" in args
        assert args[-1] == "tidewatch.tidewatch.svc.cluster.local:50051"
        (volume,) = pod["volumes"]
        assert volume["configMap"]["name"] == config["metadata"]["name"]


def test_bitnami_values_parse():
    values = yaml.safe_load((K8S / "base" / "redis" / "bitnami-values.yaml").read_text())
    assert values["architecture"] == "standalone"
    assert values["auth"]["enabled"] is False


def test_configmap_settings_are_accepted_by_the_binary(base, procs):
    config = one(base, "ConfigMap", one(base, "Deployment")["spec"]["template"]["spec"]
                 ["containers"][0]["envFrom"][0]["configMapRef"]["name"])
    # Unknown variables would be ignored silently: every key must be a setting the
    # binary documents (`[env: NAME=...]` in --help).
    help_text = subprocess.run([str(BINARY), "--help"], capture_output=True, text=True,
                               check=True).stdout
    known = set(re.findall(r"\[env: ([A-Z0-9_]+)=", help_text))
    assert known, "no environment variables in --help"
    unknown = sorted(set(config["data"]) - known)
    assert not unknown, f"ConfigMap keys the server does not read: {unknown}"
    # And it starts and serves with them (exit code 64 would be a rejected setting).
    redis_port = start_redis(procs)
    grpc_port, http_port = free_port(), free_port()
    env = server_env(config, grpc_port, http_port, redis_port)
    proc = start_server(procs, env, grpc_port, http_port)
    health = subprocess.run(
        [tool("grpcurl"), "-plaintext", "-d",
         '{"service":"tidewatch.v1.TelemetryService"}',
         f"127.0.0.1:{grpc_port}", "grpc.health.v1.Health/Check"],
        capture_output=True, text=True, timeout=30,
    )
    assert '"status": "SERVING"' in health.stdout, health.stdout + health.stderr
    assert proc.poll() is None
    # SIGTERM drains and exits 0 within SHUTDOWN_TIMEOUT.
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=parse_duration_s(config["data"]["SHUTDOWN_TIMEOUT"]) + 5)
    assert code == 0, procs.log("tidewatch")
