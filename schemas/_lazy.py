"""Lazy re-exports for a package's ``__init__`` (PEP 562), so that ``import bus`` costs nothing until a
name is used, and a command imports only the modules it needs (``cadenza --help`` none of them).

The package keeps its re-exports as ordinary ``from .x import Name as Name`` lines, but inside an
``if TYPE_CHECKING:`` block (type checkers and editors read them as before); :func:`lazy_exports`
reads that block once, on the first name asked for, and imports a name's module when the name is first
used. ``__all__`` stays the list of public names, and every name in it must appear in the block; a package
that defines no ``__all__`` (bus's subpackages) exports the whole block as its ``__all__``.
"""

from __future__ import annotations

import ast
import importlib
import sys
from collections.abc import Callable
from typing import Any

__all__ = ("lazy_exports",)


def lazy_exports(package: str) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for the package ``package`` (pass ``__name__``)."""
    table: dict[str, tuple[str, str]] = {}

    def where(name: str) -> tuple[str, str] | None:
        if not table:
            table.update(_type_checking_imports(package))
        return table.get(name)

    def __getattr__(name: str) -> Any:
        if name == "__all__":  # a package that lists no __all__ of its own exports the whole block
            where("")
            return tuple(sorted(table))
        found = where(name)
        if found is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attribute = found
        value = getattr(importlib.import_module(module, package), attribute)
        setattr(sys.modules[package], name, value)  # the next lookup is an ordinary attribute
        return value

    def __dir__() -> list[str]:
        where("")
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__


def _type_checking_imports(package: str) -> dict[str, tuple[str, str]]:
    """``{exported name: (module, attribute)}`` from the ``if TYPE_CHECKING:`` block of the
    package's ``__init__``."""
    init = sys.modules[package].__file__
    assert init is not None, f"{package} has no source file to read its exports from"
    with open(init, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found: dict[str, tuple[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            for stmt in node.body:
                if isinstance(stmt, ast.ImportFrom):
                    module = "." * stmt.level + (stmt.module or "")
                    for alias in stmt.names:
                        found[alias.asname or alias.name] = (module, alias.name)
    return found
