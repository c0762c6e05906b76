"""The README's example, run as printed against the real binary, prints what it says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from .conftest import Server

README = Path(__file__).resolve().parents[1] / "README.md"


def block(language: str) -> str:
    found = re.search(rf"```{language}\n(.*?)```", README.read_text(), re.DOTALL)
    assert found is not None, f"no {language} block in the README"
    return found.group(1)


def test_readme_example_prints_what_the_readme_says(server: Server, tmp_path: Path) -> None:
    code = block("python")
    assert "127.0.0.1:50051" in code
    script = tmp_path / "quickstart.py"
    script.write_text(code.replace("127.0.0.1:50051", server.addr))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == block("text")
