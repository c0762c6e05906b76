"""``tidewatch-send`` (the installed console script) against the real binary."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import tidewatch
from tidewatch.cli import Progress

from .conftest import Server


def send(server: Server, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    script = shutil.which("tidewatch-send", path=str(Path(sys.executable).parent))
    assert script is not None, "tidewatch-send is not installed next to this interpreter"
    return subprocess.run(
        [script, "--addr", server.addr, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_timestamp_value_csv(server: Server, tmp_path: Path) -> None:
    csv = tmp_path / "rps.csv"
    csv.write_text(
        "timestamp,rps\n"
        "2026-01-02T03:04:00Z,420\n"
        "2026-01-02T03:04:01Z,430\n"
        "2026-01-02T03:04:02Z,410\n"
        "1767323043,440\n"
        "1767323044.5,425\n"
        ",900\n"
    )
    result = send(server, "--device", "csv-1", str(csv))
    assert result.returncode == 0, result.stderr
    verdicts = [json.loads(line) for line in result.stdout.splitlines()]
    assert [v["anomaly"] for v in verdicts] == [False] * 5 + [True]
    assert {v["deviceId"] for v in verdicts} == {"csv-1"}
    assert verdicts[-1]["metrics"][0]["metric"] == "rps"
    assert verdicts[-1]["metrics"][0]["zScore"] == 47.5


def test_device_metrics_csv_from_stdin(server: Server) -> None:
    rows = ["timestamp,device_id,cpu,mem"]
    rows += [f"{1767323040 + i},gw-{i % 2},{10 + i % 3},{50 + i}" for i in range(20)]
    rows += ["1767323100,gw-0,,NaN"]
    result = send(server, "-", stdin="\n".join(rows) + "\n")
    assert result.returncode == 0, result.stderr
    verdicts = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(verdicts) == 21
    assert [v["deviceId"] for v in verdicts[:4]] == ["gw-0", "gw-1", "gw-0", "gw-1"]
    assert [m["metric"] for m in verdicts[0]["metrics"]] == ["cpu", "mem"]
    assert verdicts[-1]["error"] == 'invalid_value: metric "mem" is NaN'


def test_bad_csv_and_unreachable_server(server: Server, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("2026-01-02T03:04:00Z,not-a-number\n")
    result = send(server, str(bad))
    assert result.returncode == 1
    assert "not a number" in result.stderr
    good = tmp_path / "good.csv"
    good.write_text("2026-01-02T03:04:00Z,1\n")
    server.stop()
    result = send(server, "--max-attempts", "2", str(good))
    assert result.returncode == 1
    assert "unavailable" in result.stderr


def test_version_and_own_description(server: Server) -> None:
    version = send(server, "--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"tidewatch-send {tidewatch.__version__}"
    usage = send(server, "--help")
    assert "Stream a CSV file of samples to tidewatch" in usage.stdout


def test_progress_only_on_a_terminal(server: Server, tmp_path: Path) -> None:
    # Off a terminal (here: a pipe) stderr stays empty on success.
    csv = tmp_path / "quiet.csv"
    csv.write_text("".join(f"{1767323040 + i},{400 + i % 3}\n" for i in range(50)))
    result = send(server, "--device", "cli-quiet", str(csv))
    assert result.returncode == 0 and result.stderr == ""
    # On a terminal it draws, then erases, its line.
    out = io.StringIO()
    progress = Progress(out, enabled=True)
    progress.add(tidewatch.Verdict(anomaly=True))
    progress.finish()
    assert out.getvalue().startswith("\r\x1b[2Ktidewatch-send: 1 verdicts, 1 anomalies")
    assert out.getvalue().endswith("\r\x1b[2K")
