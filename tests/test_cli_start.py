"""``cadenza`` starts fast because nothing heavy is imported before it is needed (issue #12: under 0.3 s).

No wall clock here: these tests fail when an import-time regression comes back (a module-level import
of nats-py, pydantic, rich, OpenTelemetry's SDK or the console in the CLI's path; a pydantic model that
builds its schema at import), whatever the machine's speed.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys

import pydantic
import pytest

import bus
import schemas

#: What ``--help`` and ``--version`` must not import (any module of these packages).
HEAVY = ("nats", "pydantic", "pydantic_core", "opentelemetry", "rich", "anyio", "starlette", "uvicorn")


#: The one model built at import: constants of bus._context (SHUTDOWN) and bus.tracking._api
#: (CANCELLED_BY_USER) are instances of it.
BUILT_AT_IMPORT = "CancelCause"


def _modules_after(code: str, also: str = "") -> tuple[list[str], str]:
    """``sys.modules`` (sorted) at the end of ``code`` run in a fresh interpreter without OTEL_* set, and
    what it printed after ``also`` on a line of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "NATS_URL", "CADENZA_"))}
    dump = "\nimport json, sys\nprint('MODULES ' + json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code + dump], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith("MODULES "))
    modules: list[str] = json.loads(line.removeprefix("MODULES "))
    printed = [line.removeprefix(also).strip() for line in out.stdout.splitlines() if also and line.startswith(also)]
    return modules, (printed or [""])[0]


def _of(modules: list[str], packages: tuple[str, ...]) -> list[str]:
    return [m for m in modules if m.split(".")[0] in packages]


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["--version"], ["tail", "--help"], ["activities", "tail", "--help"], ["console", "--help"]],
    ids=" ".join,
)
def test_help_and_version_import_nothing_heavy(argv: list[str]) -> None:
    code = (
        "import contextlib, io\nfrom services.cli import main\n"
        f"with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n    main({argv!r})"
    )
    modules, _ = _modules_after(code)
    assert _of(modules, HEAVY) == []
    assert set(_of(modules, ("bus", "schemas"))) <= {"bus", "schemas", "schemas._lazy"}


@pytest.mark.parametrize(
    "argv",
    [["status"], ["tail", ">"], ["sessions", "ls"], ["activities", "ls"], ["activities", "tail", "a1"]],
    ids=" ".join,
)
def test_a_connecting_command_imports_only_what_connecting_needs(argv: list[str]) -> None:
    """Against a closed port: what the command imported until its connect failed, and no model has
    built its schema yet (that happens at its first use, after connecting)."""
    args = [*argv, "--server", "nats://127.0.0.1:1"]
    code = (
        "import contextlib, io\nfrom services.cli import main\n"
        f"with contextlib.redirect_stderr(io.StringIO()):\n    assert main({args!r}) != 0\n"
        "import pydantic\n"
        "def every(c):\n    for s in c.__subclasses__():\n        yield s\n        yield from every(s)\n"
        "built = sorted({c.__qualname__ for c in every(pydantic.BaseModel)\n"
        "                if c.__module__.split('.')[0] in ('bus', 'schemas') and c.__pydantic_complete__})\n"
        "print('BUILT ' + ' '.join(built))"
    )
    modules, built = _modules_after(code, "BUILT")
    assert built in ("", BUILT_AT_IMPORT)
    late = ("opentelemetry.sdk", "rich", "starlette", "uvicorn", "bus.sessions.", "bus.tracking._service",
            "bus._heartbeat", "bus.tracking._writer", "bus.tracking._api",
            "schemas._asyncapi", "schemas._jsonschema")  # fmt: skip
    assert [m for m in modules if m.startswith(late)] == []


def test_no_model_builds_its_schema_when_its_module_is_imported() -> None:
    """Every model of bus and schemas defers its schema (``defer_build``) to its first use."""
    code = (
        "import importlib, pkgutil, pydantic, bus, schemas\n"
        "for pkg in (bus, schemas):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(f'{pkg.__name__}.{m.name}')\n"
        "def every(c):\n    for s in c.__subclasses__():\n        yield s\n        yield from every(s)\n"
        "models = {c for c in every(pydantic.BaseModel) if c.__module__.split('.')[0] in ('bus', 'schemas')}\n"
        "print('BUILT ' + ' '.join(sorted(c.__qualname__ for c in models if c.__pydantic_complete__)))\n"
        "print('DEFERRED ' + str(sum(not c.__pydantic_complete__ for c in models)))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    built = next(line for line in out.stdout.splitlines() if line.startswith("BUILT")).split()[1:]
    deferred = int(next(line for line in out.stdout.splitlines() if line.startswith("DEFERRED")).split()[1])
    assert built == [BUILT_AT_IMPORT]
    assert deferred > 40


def test_the_lazy_packages_answer_every_public_name_and_refuse_others() -> None:
    for package in (bus, schemas):
        assert set(package.__all__) <= set(dir(package))
        for name in package.__all__:
            assert getattr(package, name) is not None
        with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
            package.no_such_name  # noqa: B018 - the lookup is the test


def test_every_module_that_declares_events_is_in_the_registry_list() -> None:
    from schemas._envelope import _EVENT_MODULES

    for m in pkgutil.iter_modules(schemas.__path__):
        importlib.import_module(f"schemas.{m.name}")
    declaring = {cls.__module__.removeprefix("schemas.") for cls in schemas.event_types().values()}
    assert declaring == set(_EVENT_MODULES)
    assert all(issubclass(cls, pydantic.BaseModel) for cls in schemas.event_types().values())
