"""Every ```python block of the README runs against a real server, so the docs never rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import bus

README = Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples() -> None:
    assert BLOCKS


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index: int, nats_server: bus.EmbeddedServer, tmp_path: Path) -> None:
    script = tmp_path / f"block{index}.py"
    script.write_text(BLOCKS[index])
    env = {**os.environ, "NATS_URL": nats_server.url, "CADENZA_PREFIX": f"readme{index}{os.getpid()}"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90, env=env)
    assert out.returncode == 0, f"README block {index} failed:\n{out.stdout}\n{out.stderr}"
