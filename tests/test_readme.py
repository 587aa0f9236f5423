"""Every ```python block of the README (and of docs/sessions.md) runs against a real server, so the docs
never rot; the README's event-type table is the one the code generates."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import bus
import schemas

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
#: Documents whose ```python blocks are complete programs (docs/activities.md shows fragments).
RUNNABLE = (README, ROOT / "docs" / "sessions.md")
BLOCKS = [
    (doc.relative_to(ROOT).as_posix(), i, block)
    for doc in RUNNABLE
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S))
]


def test_readme_has_python_examples() -> None:
    assert {doc for doc, _, _ in BLOCKS} == {d.relative_to(ROOT).as_posix() for d in RUNNABLE}


@pytest.mark.parametrize(("doc", "index", "code"), BLOCKS, ids=[f"{d}#{i}" for d, i, _ in BLOCKS])
def test_readme_python_block_runs(
    doc: str, index: int, code: str, nats_server: bus.EmbeddedServer, tmp_path: Path
) -> None:
    script = tmp_path / f"block{index}.py"
    script.write_text(code)
    env = {
        **os.environ,
        "NATS_URL": nats_server.url,
        "CADENZA_PREFIX": f"readme{index}{os.getpid()}{abs(hash(doc)) % 10_000}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])),
    }
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90, env=env)
    assert out.returncode == 0, f"{doc} block {index} failed:\n{out.stdout}\n{out.stderr}"


def event_type_table(prefix: str = "cadenza") -> str:
    """The README's event-type table, from ``schemas.event_types()``."""
    rows = ["| type | subject | what |", "|---|---|---|"]
    for name, cls in schemas.event_types().items():
        subjects = cls.subject_pattern().replace("<prefix>", prefix).split(" | ")
        what = (cls.__doc__ or "").strip().splitlines()[0]
        what = re.sub(r":class:`(\w+)`", r"`\1`", what).replace("``", "`")
        rows.append(f"| `{name}` | {' or '.join(f'`{s}`' for s in subjects)} | {what} |")
    return "\n".join(rows)


def test_readme_event_type_table_is_generated_from_the_schemas() -> None:
    text = README.read_text()
    found = re.search(r"<!-- event-types:start -->\n(.*?)\n<!-- event-types:end -->", text, flags=re.S)
    assert found, "README.md lost its event-types markers"
    expected = event_type_table()
    assert found.group(1) == expected, f"README's event-type table is stale; it should read:\n{expected}"
