"""The floor plan of ``bus`` (issue #14), pinned by reading the imports of every module.

Imports point one way, from the top of this list to the bottom::

    bus, bus.testing                      the facade (lazy re-exports) and the test fixtures
    bus.sessions                          the session client, the worker runtime, the running activity
    bus.tracking                          tracked activities: the API, the bus-backed service, writer, reader, fold
    bus._cancel, bus._heartbeat           shared by both halves: cancel routing, process heartbeats
    bus.transport                         connection, server, topology, codec, retry, tracing, followers
    bus._config, bus._context, bus._exceptions   the shared base: no bus import at all

Outside ``bus``, the services, the bench and the schemas import only public names (``bus``,
``bus.transport``, ``bus.tracking``, ``bus.sessions``, ``bus.testing``), never a private ``bus._x`` module.
In ``tests``, no module imports a test module (``tests/test_*.py``): what tests share is in
``tests/_helpers.py`` (fixtures in ``tests/conftest.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_LAYERS: tuple[tuple[str, ...], ...] = (
    ("bus._config", "bus._context", "bus._exceptions"),
    ("bus.transport",),
    ("bus._cancel", "bus._heartbeat"),
    ("bus.tracking",),
    ("bus.sessions",),
    ("bus.testing", "bus"),
)


def _layer(module: str) -> int:
    """The rank of a bus module: the most specific prefix in :data:`_LAYERS` wins."""
    best, rank = "", -1
    for i, prefixes in enumerate(_LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, rank = prefix, i
    assert rank >= 0, f"{module} is in no layer of tests/test_layers.py: place it"
    return rank


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import in the file, relative ones resolved; for
    ``from package import name`` both the package and ``package.name`` (which may be a module)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def _bus_modules() -> list[Path]:
    return sorted((ROOT / "bus").rglob("*.py"))


def _is_module(name: str) -> bool:
    parts = name.split(".")
    path = ROOT.joinpath(*parts)
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


@pytest.mark.parametrize("path", _bus_modules(), ids=lambda p: _module_name(p))
def test_bus_imports_point_one_way(path: Path) -> None:
    """A bus module imports only modules of its own layer or of the layers below it."""
    own = _layer(_module_name(path))
    upward = [
        f"line {line}: {target}"
        for line, target in _imports(path)
        if (target == "bus" or target.startswith("bus.")) and _is_module(target) and _layer(target) > own
    ]
    assert upward == [], f"{_module_name(path)} (layer {own}) imports from a layer above it: {upward}"


def test_the_fold_is_pure() -> None:
    """The activity fold needs neither NATS nor the transport: it folds events it is given."""
    path = ROOT / "bus" / "tracking" / "_fold.py"
    bad = [t for _, t in _imports(path) if t.startswith(("nats", "bus.transport", "anyio"))]
    assert bad == []


def _outside_modules() -> list[Path]:
    return sorted(p for d in ("services", "bench", "schemas") for p in (ROOT / d).rglob("*.py"))


def test_nothing_outside_bus_imports_a_private_bus_module() -> None:
    """Services, bench and schemas use the public packages, not ``bus._x`` or ``bus.transport._x``."""
    private = [
        f"{p.relative_to(ROOT)}:{line}: {target}"
        for p in _outside_modules()
        for line, target in _imports(p)
        if target.startswith("bus.")
        and _is_module(target)
        and any(part.startswith("_") for part in target.split(".")[1:])
    ]
    assert private == []


def test_every_bus_module_is_in_a_layer() -> None:
    for path in _bus_modules():
        _layer(_module_name(path))


def _engine_free_modules() -> list[Path]:
    """Every module of ``bus`` outside ``bus.transport``, and of ``services``."""
    bus_side = [p for p in _bus_modules() if not _module_name(p).startswith("bus.transport")]
    return sorted(bus_side + list((ROOT / "services").rglob("*.py")))


def test_nothing_outside_the_transport_imports_nats() -> None:
    """nats-py (its client, its messages, its errors) is the transport's: the rest uses cadenza's types
    and catches cadenza's errors (``bus.transport.engine_errors`` translates at the boundary)."""
    found = [
        f"{p.relative_to(ROOT)}:{line}: {target}"
        for p in _engine_free_modules()
        for line, target in _imports(p)
        if target == "nats" or target.startswith("nats.")
    ]
    assert found == []


def _test_module(target: str) -> str | None:
    """The test module (``tests/test_*.py``) an import names, if it names one."""
    name = target.removeprefix("tests.")
    if name.startswith("test_") and "." not in name and (ROOT / "tests" / f"{name}.py").exists():
        return name
    return None


def test_no_module_of_the_tests_imports_a_test_module() -> None:
    """A test module holds tests; what several share lives in tests/_helpers.py or a conftest fixture."""
    found = [
        f"{p.relative_to(ROOT)}:{line}: {target}"
        for p in sorted((ROOT / "tests").glob("*.py"))
        for line, target in _imports(p)
        if _test_module(target) is not None
    ]
    assert found == []
