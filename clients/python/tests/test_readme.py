"""The README's examples, run as printed against the real binary, print what it says:
all of them on one server, in README order and then in reverse order on another, so
none depends on the other examples not having run."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

from .conftest import Server

README = Path(__file__).resolve().parents[1] / "README.md"
REPO = README.parents[2]


def examples() -> list[tuple[str, str]]:
    """(python block, the text block after it) for every example."""
    text = README.read_text()
    found = re.findall(r"```python\n(.*?)```.*?```text\n(.*?)```", text, re.DOTALL)
    assert len(found) == 2, "expected the asyncio and the synchronous example"
    return found


def run(code: str, server: Server, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    assert "127.0.0.1:50051" in code
    script = tmp_path / "example.py"
    script.write_text(code.replace("127.0.0.1:50051", server.addr))
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )


def test_readme_examples_print_what_the_readme_says(server: Server, tmp_path: Path) -> None:
    for code, expected in examples():
        result = run(code, server, tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected
    other = Server()
    other.start()
    try:
        for code, expected in reversed(examples()):
            result = run(code, other, tmp_path)
            assert result.returncode == 0, result.stderr
            assert result.stdout == expected
    finally:
        other.stop(signal.SIGKILL)


def test_each_example_has_a_device_of_its_own() -> None:
    ids = {d for code, _ in examples() for d in re.findall(r'"(py-[a-z]+-\d+)"', code)}
    assert ids == {"py-async-1", "py-sync-1"}
    others = [REPO / "README.md", REPO / "clients" / "typescript" / "README.md"]
    others += sorted((REPO / "clients" / "rust").glob("**/*.rs"))
    others += sorted((REPO / "clients" / "rust").glob("**/*.md"))
    for path in others:
        if path.exists():
            text = path.read_text()
            assert not any(f'"{d}"' in text or f" {d}" in text for d in ids), path
