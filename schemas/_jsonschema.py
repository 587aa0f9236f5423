"""JSON Schema files generated from the event models (``schemas/json/``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ._envelope import event_types

__all__ = ["JSON_DIR", "export_json_schemas", "json_schemas"]

#: Where the generated JSON Schema files live (checked in, checked by CI).
JSON_DIR = Path(__file__).parent / "json"


def json_schemas() -> dict[str, str]:
    """File name -> JSON Schema text for every registered event type."""
    out: dict[str, str] = {}
    for name, cls in event_types().items():
        schema: dict[str, Any] = cls.model_json_schema(mode="serialization")
        schema["$id"] = f"https://cadenza.dev/schemas/v{cls.SCHEMA_VERSION}/{name}.json"
        schema["x-cadenza-subject"] = cls.subject_pattern()
        out[f"{name}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def export_json_schemas(directory: Path = JSON_DIR, *, check: bool = False) -> list[str]:
    """Write (or, with ``check``, compare) the schema files; returns the names that differ.

    In check mode nothing is written; a stale or missing file, or a file for an event type that
    no longer exists, is reported.
    """
    wanted = json_schemas()
    differ: list[str] = []
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in wanted.items():
        path = directory / name
        current = path.read_text() if path.exists() else None
        if current != text:
            differ.append(name)
            if not check:
                path.write_text(text)
    for path in sorted(directory.glob("*.json")):
        if path.name not in wanted:
            differ.append(path.name)
            if not check:
                path.unlink()
    return differ
