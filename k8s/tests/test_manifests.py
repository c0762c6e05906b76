"""The Kubernetes manifests, checked offline: kustomize renders the base, the minikube
overlay and the ghz Jobs; kubernetes-validate --strict accepts every built-in object
for a current Kubernetes; the CRD objects and the wiring between objects (selectors,
ports, probes, the ConfigMap, Secrets, certificates, NetworkPolicies) are consistent;
the ConfigMap's settings are ones the real binary accepts, and it starts and serves
with them, and with the Deployment's TLS and policy settings.

kubernetes-validate ships schemas for built-in kinds only: the prometheus-operator
(ServiceMonitor, PrometheusRule) and cert-manager (Issuer, Certificate) objects are not
schema-validated here. Their fields are checked by the structural tests below instead
(test_monitoring_objects, test_cert_manager_chain)."""

from __future__ import annotations

import base64
import copy
import json
import re
import signal
import ssl
import subprocess
import urllib.error
import urllib.request

import pytest
import yaml
from conftest import (
    BINARY,
    admin_port,
    http_get,
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
CRD_GROUPS = ("monitoring.coreos.com/", "cert-manager.io/")
# Where the Deployment mounts its Secrets, and the settings that name the files.
TLS_DIR = "/etc/tidewatch/tls"
AUTH_DIR = "/etc/tidewatch/auth"
SECURE_SETTINGS = {
    "TLS_CERT": f"{TLS_DIR}/tls.crt",
    "TLS_KEY": f"{TLS_DIR}/tls.key",
    "AUTH_POLICY": f"{AUTH_DIR}/policy.json",
}
# The example policy's documented example key (k8s/README.md, "Credentials").
EXAMPLE_KEY = "example-fleet-a-key-REPLACE-ME"
SHUTDOWN_TIMEOUT_DEFAULT_S = 20


def parse_duration_s(value: str) -> float:
    """The seconds of a humantime-style duration the server accepts (`20s`, `5m`)."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", value):
        total += float(number) * units[unit]
    assert total > 0 or value.strip() == "0", f"unparsed duration {value!r}"
    return total


@pytest.mark.parametrize("name", ["base", "minikube", "redis_cluster", "ghz_jobs"])
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
        "Certificate", "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Ingress",
        "Issuer", "Namespace", "NetworkPolicy", "PodDisruptionBudget", "PrometheusRule",
        "Secret", "Service", "ServiceAccount", "ServiceMonitor", "StatefulSet",
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
    # Probes: plain HTTP on the admin listener (the API ports want TLS and a token).
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "http": 8080, "admin": 9090}
    for probe, path in (("startupProbe", "/healthz"), ("readinessProbe", "/readyz"),
                        ("livenessProbe", "/healthz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "admin"}, probe
    # The ConfigMap it reads is the generated one, and binds the ports declared here.
    (env_from,) = container["envFrom"]
    config = one(base, "ConfigMap", env_from["configMapRef"]["name"])["data"]
    assert config["GRPC_ADDR"] == f"0.0.0.0:{ports['grpc']}"
    assert config["LISTEN_ADDR"] == f"0.0.0.0:{ports['http']}"
    assert config["ADMIN_ADDR"] == f"0.0.0.0:{ports['admin']}"
    assert "ALLOW_INSECURE" not in config
    assert parse_duration_s(config["MAX_CONNECTION_AGE"]) > 0
    # Memory (docs/operations.md, "Sizing"): MEMORY_BUDGET is left to its default, 3/4
    # of the container's limit, which holds MAX_DEVICES devices of 2 metrics x 50
    # values at what the budget charges each (1,059 bytes).
    assert "MEMORY_BUDGET" not in config
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Mi"), limit
    assert int(config["MAX_DEVICES"]) * 1059 <= int(limit[:-2]) * 2**20 * 3 // 4
    # The Redis password comes from its Secret, spliced into REDIS_URL by the kubelet.
    env = {e["name"]: e for e in container["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "tidewatch-redis", "key": "password"}
    redis_host = re.fullmatch(r"redis://:\$\(REDIS_PASSWORD\)@([a-z0-9-]+):6379",
                              env["REDIS_URL"]["value"])
    assert redis_host, env["REDIS_URL"]
    names = [e["name"] for e in container["env"]]
    assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL")  # $(VAR) order
    # The OpenTelemetry resource names the pod, from the downward API.
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    attributes = dict(kv.split("=", 1) for kv in env["OTEL_RESOURCE_ATTRIBUTES"]["value"].split(","))
    assert attributes["service.instance.id"] == "$(POD_NAME)", attributes
    assert names.index("POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")
    assert config["OTEL_SERVICE_NAME"] == "tidewatch"
    one(base, "Service", redis_host.group(1))
    one(base, "Secret", "tidewatch-redis")
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


@pytest.mark.parametrize("name", ["base", "minikube", "redis_cluster"])
def test_every_deployment_runs_with_tls_and_a_policy(name, request):
    objects = request.getfixturevalue(name)
    deployments = find(objects, "Deployment")
    assert deployments
    for deploy in deployments:
        pod = deploy["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            for setting, path in SECURE_SETTINGS.items():
                assert env.get(setting) == path, (deploy["metadata"]["name"], setting)
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            # Whole-directory mounts: a subPath mount never sees a renewed certificate.
            for directory, secret in ((TLS_DIR, "tidewatch-tls"), (AUTH_DIR, "tidewatch-auth")):
                mount = mounts[directory]
                assert "subPath" not in mount and mount["readOnly"] is True
                assert volumes[mount["name"]]["secret"]["secretName"] == secret
        # The files are 0440 and the group is the process's, so it can read them.
        assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    # The policy Secret holds the file AUTH_POLICY names, and it is a valid policy.
    policy = json.loads(_secret_text(objects, "tidewatch-auth", "policy.json"))
    for principal in policy["principals"]:
        assert principal["name"].startswith("example-"), "example values must say so"
        assert set(principal["scopes"]) <= {"ingest", "analyze", "watch", "admin"}
        for digest in principal["api_keys_sha256"]:
            assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert _secret_text(objects, "tidewatch-redis", "password").startswith("example-")


def _secret_text(objects: list[dict], name: str, key: str) -> str:
    return base64.b64decode(one(objects, "Secret", name)["data"][key]).decode()


def test_cert_manager_chain(base):
    issuers = {i["metadata"]["name"]: i["spec"] for i in find(base, "Issuer")}
    certs = {c["metadata"]["name"]: c["spec"] for c in find(base, "Certificate")}
    # self-signed Issuer -> CA Certificate -> CA Issuer -> server Certificate.
    assert "selfSigned" in issuers["tidewatch-selfsigned"]
    ca = certs["tidewatch-ca"]
    assert ca["isCA"] is True
    assert ca["issuerRef"] == {"name": "tidewatch-selfsigned", "kind": "Issuer",
                               "group": "cert-manager.io"}
    assert issuers["tidewatch-ca"]["ca"]["secretName"] == ca["secretName"]
    server = certs["tidewatch-tls"]
    assert server["issuerRef"]["name"] == "tidewatch-ca"
    assert server["secretName"] == "tidewatch-tls"
    assert not server.get("isCA", False)
    # Every in-cluster name clients dial, including the one ingress-nginx verifies.
    assert {"tidewatch.tidewatch.svc", "tidewatch.tidewatch.svc.cluster.local"} <= set(
        server["dnsNames"])
    for spec in certs.values():
        assert spec["issuerRef"]["name"] in issuers
        assert spec["renewBefore"] and spec["duration"]
    for ing in find(base, "Ingress"):
        annotations = ing["metadata"]["annotations"]
        assert annotations["cert-manager.io/issuer"] in issuers
        assert annotations["nginx.ingress.kubernetes.io/proxy-ssl-verify"] == "on"
        assert annotations["nginx.ingress.kubernetes.io/proxy-ssl-secret"] == (
            "tidewatch/" + server["secretName"])
        assert annotations["nginx.ingress.kubernetes.io/proxy-ssl-name"] in server["dnsNames"]


def _selects(selector: dict, labels: dict) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items()


def test_network_policies(base):
    deploy = one(base, "Deployment", "tidewatch")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    redis_labels = one(base, "StatefulSet", "redis")["spec"]["template"]["metadata"]["labels"]
    policies = find(base, "NetworkPolicy")
    tidewatch = [p for p in policies if _selects(p["spec"]["podSelector"], pod_labels)]
    redis = [p for p in policies if _selects(p["spec"]["podSelector"], redis_labels)]
    assert len(tidewatch) == 1 and len(redis) == 1
    # tidewatch: the ingress controller on the API ports, Prometheus on admin, no one else.
    rules = tidewatch[0]["spec"]["ingress"]
    assert tidewatch[0]["spec"]["policyTypes"] == ["Ingress"]
    admitted = {}
    for rule in rules:
        (peer,) = rule["from"]
        namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        app = peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
        admitted[(namespace, app)] = sorted(p["port"] for p in rule["ports"])
    assert admitted == {("ingress-nginx", "ingress-nginx"): ["grpc", "http"],
                        ("monitoring", "prometheus"): ["admin"]}
    # The ports named are the container's.
    container_ports = {p["name"] for p in deploy["spec"]["template"]["spec"]["containers"][0]
                       ["ports"]}
    assert {"grpc", "http", "admin"} <= container_ports
    # Redis: only tidewatch's pods, only the Redis port; Prometheus only the exporter's.
    rule, exporter = redis[0]["spec"]["ingress"]
    (scraper,) = exporter["from"]
    assert scraper["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"}
    assert scraper["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    assert [p["port"] for p in exporter["ports"]] == ["metrics"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # this namespace only
    assert _selects(peer["podSelector"], pod_labels)
    assert [p["port"] for p in rule["ports"]] == ["redis"]
    # Redis wants the password from the same Secret.
    redis_container = one(base, "StatefulSet", "redis")["spec"]["template"]["spec"][
        "containers"][0]
    assert "--requirepass" in redis_container["args"]
    env = {e["name"]: e for e in redis_container["env"]}
    for name in ("REDIS_PASSWORD", "REDISCLI_AUTH"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "tidewatch-redis"


def test_services_ingress_hpa_pdb(base):
    deploy = one(base, "Deployment", "tidewatch")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    main = one(base, "Service", "tidewatch")
    headless = one(base, "Service", "tidewatch-headless")
    assert headless["spec"]["clusterIP"] == "None"
    for svc in (main, headless):
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        by_name = {p["name"]: p for p in svc["spec"]["ports"]}
        assert {"grpc", "http"} <= set(by_name)
        assert by_name["grpc"]["appProtocol"] == "https"
        assert by_name["http"]["appProtocol"] == "https"
    # Only the main Service has the admin port (the ServiceMonitor scrapes each pod once).
    assert {p["name"]: p["appProtocol"] for p in main["spec"]["ports"]}["admin"] == "http"
    grpc_ing = one(base, "Ingress", "tidewatch-grpc")
    http_ing = one(base, "Ingress", "tidewatch-http")
    annotations = grpc_ing["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPCS"
    assert http_ing["metadata"]["annotations"][
        "nginx.ingress.kubernetes.io/backend-protocol"] == "HTTPS"
    assert http_ing["metadata"]["annotations"][
        "nginx.ingress.kubernetes.io/upstream-hash-by"] == "$http_x_device_id"
    for ing, port in ((grpc_ing, "grpc"), (http_ing, "http")):
        assert ing["spec"]["ingressClassName"] == "nginx"
        # TLS for every host the Ingress serves.
        tls_hosts = {h for t in ing["spec"]["tls"] for h in t["hosts"]}
        assert {r["host"] for r in ing["spec"]["rules"]} <= tls_hosts
        assert all(t["secretName"] for t in ing["spec"]["tls"])
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
    limit_mib = int(limit[:-2]) * {"Gi": 1024, "Mi": 1}[limit[-2:]]
    assert int(maxmemory[:-2]) * 1.5 <= limit_mib, (maxmemory, limit)
    (config,) = [c["data"] for c in find(base, "ConfigMap") if "MAX_DEVICES" in c["data"]]
    devices = int(config["MAX_DEVICES"])
    # 1,587 bytes per device with 2 metrics x 50 values and 34-byte ids: the
    # snapshot, version and owner keys (the manifest's comment, docs/capacity.md).
    assert devices * 1587 <= int(maxmemory[:-2]) * 1e6 * 0.8, (devices, maxmemory)


def test_monitoring_objects(base):
    monitor = one(base, "ServiceMonitor", "tidewatch")
    selector = monitor["spec"]["selector"]["matchLabels"]
    # Exactly one Service is scraped (not the headless one too: each pod once).
    scraped = [s for s in find(base, "Service")
               if selector.items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in scraped] == ["tidewatch"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in scraped[0]["spec"]["ports"]}
    # The admin listener: plain HTTP, no token.
    assert (endpoint["port"], endpoint["scheme"]) == ("admin", "http")
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
    tls_hosts = {h for i in find(minikube, "Ingress") for t in i["spec"]["tls"] for h in t["hosts"]}
    assert tls_hosts == hosts
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
        # TLS against the server's CA, the token from the ghz-token Secret.
        assert "--insecure=false" in args and "--cacert=/tls/ca.crt" in args
        assert '--metadata={"authorization":"Bearer $(GHZ_TOKEN)"}' in args
        (token,) = container["env"]
        assert token["valueFrom"]["secretKeyRef"] == {"name": "ghz-token", "key": "token"}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["ghz-config"]["configMap"]["name"] == config["metadata"]["name"]
        # Only the CA certificate of the server's Secret is projected, not its key.
        ca = volumes["tidewatch-ca"]["secret"]
        assert ca["secretName"] == "tidewatch-tls"
        assert ca["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    one(ghz_jobs, "Secret", "ghz-token")
    # The jobs may reach tidewatch's gRPC port despite the base's NetworkPolicy.
    (policy,) = find(ghz_jobs, "NetworkPolicy")
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "ghz"}}}]
    assert [p["port"] for p in rule["ports"]] == ["grpc"]


def test_bitnami_values_parse():
    values = yaml.safe_load((K8S / "base" / "redis" / "bitnami-values.yaml").read_text())
    assert values["architecture"] == "standalone"
    assert values["auth"]["enabled"] is True
    assert values["auth"]["existingSecret"] == "tidewatch-redis"


def test_redis_cluster_overlay(redis_cluster):
    # The base's single Redis is gone; tidewatch names the chart's pods as seeds.
    assert not find(redis_cluster, "StatefulSet")
    assert not [s for s in find(redis_cluster, "Service") if s["metadata"]["name"] == "redis"]
    assert [n["metadata"]["name"] for n in find(redis_cluster, "NetworkPolicy")] == ["tidewatch"]
    values = yaml.safe_load(
        (K8S / "overlays" / "redis-cluster" / "redis-cluster-values.yaml").read_text())
    assert values["cluster"] == {"nodes": 6, "replicas": 1}
    assert values["existingSecret"] == "tidewatch-redis"
    assert values["networkPolicy"]["allowExternal"] is False
    deploy = one(redis_cluster, "Deployment", "tidewatch")
    template = deploy["spec"]["template"]
    # The chart's NetworkPolicy admits pods labelled <fullname>-client=true.
    assert template["metadata"]["labels"][f"{values['fullnameOverride']}-client"] == "true"
    env = template["spec"]["containers"][0]["env"]
    names = [e["name"] for e in env]
    assert "REDIS_URL" not in names
    # $(REDIS_PASSWORD) is spliced only from a variable defined above.
    assert names.index("REDIS_PASSWORD") < names.index("REDIS_CLUSTER_NODES")
    nodes = next(e["value"] for e in env if e["name"] == "REDIS_CLUSTER_NODES").split(",")
    full = values["fullnameOverride"]
    assert nodes[0].startswith("redis://:$(REDIS_PASSWORD)@")
    hosts = [n.rsplit("@", 1)[-1] for n in nodes]
    assert hosts == [f"{full}-{i}.{full}-headless:6379" for i in range(3)]
    assert len(hosts) <= values["cluster"]["nodes"]


def test_redis_cluster_seeds_are_accepted_by_the_binary(redis_cluster, procs):
    # The overlay's REDIS_CLUSTER_NODES as the kubelet splices it: the binary accepts
    # it (exit code 64 would be a rejected setting), starts and serves while the
    # seeds do not resolve here, and drains on SIGTERM.
    config = one(redis_cluster, "ConfigMap", one(redis_cluster, "Deployment")["spec"]
                 ["template"]["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["name"])
    deploy = one(redis_cluster, "Deployment", "tidewatch")
    env_list = deploy["spec"]["template"]["spec"]["containers"][0]["env"]
    seeds = next(e["value"] for e in env_list if e["name"] == "REDIS_CLUSTER_NODES")
    grpc_port, http_port = free_port(), free_port()
    env = server_env(config, grpc_port, http_port, 0)
    del env["REDIS_URL"]
    env["REDIS_CLUSTER_NODES"] = seeds.replace("$(REDIS_PASSWORD)", "example-password")
    proc = start_server(procs, env, grpc_port, http_port)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=parse_duration_s(config["data"]["SHUTDOWN_TIMEOUT"]) + 5)
    log = procs.log("tidewatch")
    assert code == 0, log
    # Snapshots were on, in cluster mode, and the password never reached the log.
    started = [json.loads(line) for line in log.splitlines() if "snapshots on" in line]
    assert started and started[0]["redis_cluster"] is True, log
    assert "example-password" not in log


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


def test_deployment_tls_and_policy_work_with_the_binary(base, procs, tmp_path):
    # The Deployment's credential settings with files laid out as the pod sees them
    # (cert-manager's tls.crt/tls.key/ca.crt, the policy Secret's policy.json): gRPC and
    # REST want TLS and a policy key, the admin listener answers plain HTTP without one.
    deploy = one(base, "Deployment", "tidewatch")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    config = one(base, "ConfigMap", container["envFrom"][0]["configMapRef"]["name"])
    tls_dir, auth_dir = tmp_path / "tls", tmp_path / "auth"
    tls_dir.mkdir()
    auth_dir.mkdir()
    subprocess.run(["sh", str(REPO / "clients" / "test-certs.sh"), str(tls_dir),
                    "spiffe://tidewatch.test/unused"], check=True)
    (tls_dir / "server.pem").rename(tls_dir / "tls.crt")
    (tls_dir / "server.key").rename(tls_dir / "tls.key")
    (tls_dir / "ca.pem").rename(tls_dir / "ca.crt")
    (auth_dir / "policy.json").write_text(_secret_text(base, "tidewatch-auth", "policy.json"))
    redis_port = start_redis(procs)
    grpc_port, http_port = free_port(), free_port()
    env = server_env(config, grpc_port, http_port, redis_port)
    settings = {e["name"]: e.get("value") for e in container["env"]}
    for setting in SECURE_SETTINGS:
        env[setting] = (settings[setting].replace(TLS_DIR, str(tls_dir))
                        .replace(AUTH_DIR, str(auth_dir)))
    admin = admin_port(env)
    assert admin, "the ConfigMap sets ADMIN_ADDR"
    start_server(procs, env, grpc_port, http_port)
    assert http_get(f"http://127.0.0.1:{admin}/readyz")[0] == 200
    status, body = http_get(f"http://127.0.0.1:{admin}/metrics")
    assert status == 200 and b"# TYPE" in body

    def grpcurl(key: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [tool("grpcurl"), "-cacert", str(tls_dir / "ca.crt"),
             "-H", f"authorization: Bearer {key}", "-d", '{"device_id":"fleet-a/none"}',
             f"localhost:{grpc_port}", "tidewatch.v1.TelemetryService/Analyze"],
            capture_output=True, text=True, timeout=30)

    known = grpcurl(EXAMPLE_KEY)
    assert "NotFound" in known.stdout + known.stderr, known.stdout + known.stderr
    wrong = grpcurl("not-a-key")
    assert "Unauthenticated" in wrong.stdout + wrong.stderr, wrong.stdout + wrong.stderr

    context = ssl.create_default_context(cafile=str(tls_dir / "ca.crt"))

    def rest(key: str | None) -> int:
        request = urllib.request.Request(
            f"https://localhost:{http_port}/analyze?device_id=fleet-a/none",
            headers={"authorization": f"Bearer {key}"} if key else {})
        try:
            with urllib.request.urlopen(request, context=context, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert rest(EXAMPLE_KEY) == 404
    assert rest(None) == 401
    assert rest("not-a-key") == 401
