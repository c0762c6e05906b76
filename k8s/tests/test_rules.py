"""The PrometheusRule's groups, checked by promtool: `check rules` accepts them, and
`test rules` (rules_test.yaml) shows every alert firing on a synthetic series and
silent on a healthy one, for the base and for the minikube overlay's threshold."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml
from conftest import one, tool

HERE = Path(__file__).resolve().parent


def write_rules(objects: list[dict], directory: Path) -> Path:
    """The PrometheusRule's spec as a Prometheus rules file."""
    rule = one(objects, "PrometheusRule", "tidewatch")
    path = directory / "tidewatch.rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
    return path


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True)


def test_check_rules(base, minikube, tmp_path):
    for name, objects in (("base", base), ("minikube", minikube)):
        directory = tmp_path / name
        directory.mkdir()
        result = promtool("check", "rules", str(write_rules(objects, directory)))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS: 9 rules found" in result.stdout, result.stdout


def test_unit_tests_cover_every_alert_both_ways(base):
    alerts = {r["alert"] for g in one(base, "PrometheusRule")["spec"]["groups"]
              for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((HERE / "rules_test.yaml").read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    fires = {c["alertname"] for c in cases if c["exp_alerts"]}
    silent = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert fires == alerts
    assert silent == alerts


def test_unit_tests_pass(base, tmp_path):
    write_rules(base, tmp_path)
    shutil.copy(HERE / "rules_test.yaml", tmp_path)
    result = promtool("test", "rules", str(tmp_path / "rules_test.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_tests_fail_on_a_broken_rule(base, tmp_path):
    # The same unit tests against rules whose HighAnomalyRate never fires must fail:
    # they really look at the alerts.
    write_rules(base, tmp_path)
    rules = tmp_path / "tidewatch.rules.yaml"
    rules.write_text(rules.read_text().replace("vector(0.05)", "vector(0.5)"))
    shutil.copy(HERE / "rules_test.yaml", tmp_path)
    result = promtool("test", "rules", str(tmp_path / "rules_test.yaml"))
    assert result.returncode != 0
    assert "HighAnomalyRate" in result.stdout + result.stderr


def test_overlay_threshold_applies(minikube, tmp_path):
    # The minikube overlay's threshold (10 %) leaves a 10 % share silent.
    write_rules(minikube, tmp_path)
    shutil.copy(HERE / "rules_test.yaml", tmp_path)
    result = promtool("test", "rules", str(tmp_path / "rules_test.yaml"))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "alertname: HighAnomalyRate" in output
    assert "TidewatchDown" not in output and "LoadShedding" not in output
