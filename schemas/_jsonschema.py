"""JSON Schema files generated from the models (``schemas/json/``): one per message on the wire.

The catalogue (:func:`wire_models`) names every shape a non-Python client sends, receives or reads:

* ``<domain>.<event>.json``: each event (the stored events, the task result, the dead-letter entry);
* ``rpc.<service>.<method>.request.json`` / ``.reply.json``: each request/reply endpoint; the reply
  is the envelope, ``{"ok": true, "result": ...}`` or the error reply (``rpc.error.json``);
* ``kv.<bucket>.json``: the value of a key in each key-value bucket.

Every file is draft 2020-12 with ``$schema`` and ``$id``; id fields carry the subject-token pattern
the bus accepts (:data:`schemas.TOKEN_PATTERN`). The AsyncAPI document (``schemas/_asyncapi.py``)
is built from the same catalogue.
"""

from __future__ import annotations

import functools
import json
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, TypeAdapter, create_model

from ._envelope import Event, event_types
from ._rpc import ENDPOINTS, Endpoint, ErrorReply
from ._session import SessionRecord, WorkerRecord

__all__ = [
    "BUCKETS",
    "JSON_DIR",
    "WireModel",
    "export_json_schemas",
    "json_schemas",
    "ok_reply",
    "schema_id",
    "wire_models",
]

#: Where the generated JSON Schema files live (checked in, checked by CI).
JSON_DIR = Path(__file__).parent / "json"

DRAFT: Final = "https://json-schema.org/draft/2020-12/schema"
_BASE: Final = "https://cadenza.dev/schemas/v1/"

#: The key-value buckets and the model of their values.
BUCKETS: Final[dict[str, tuple[type[BaseModel], str]]] = {
    "sessions": (SessionRecord, "the broker's record of a session; key = session id"),
    "workers": (WorkerRecord, "the broker's record of a session worker and its slots; key = worker id"),
}


@dataclass(frozen=True, slots=True)
class WireModel:
    """One shape on the wire: its schema file stem, its model(s) (a reply is one of two), where it travels."""

    name: str
    models: tuple[type[BaseModel], ...]
    where: str

    def json_schema(self) -> dict[str, Any]:
        """The shape's JSON Schema (``$defs`` inside, refs ``#/$defs/...``)."""
        if len(self.models) == 1:
            return self.models[0].model_json_schema(mode="serialization")
        union: Any = functools.reduce(operator.or_, self.models)
        schema: dict[str, Any] = TypeAdapter(union).json_schema(mode="serialization")
        return {"title": self.name, **schema}


def schema_id(name: str) -> str:
    """The ``$id`` of the schema file ``<name>.json``."""
    return f"{_BASE}{name}.json"


def ok_reply(endpoint: Endpoint) -> type[BaseModel]:
    """The envelope an endpoint answers with when the request worked: ``{"ok": true, "result": ...}``."""
    title = f"{endpoint.reply.__name__}Ok"
    model: type[BaseModel] = create_model(
        title,
        __config__=ConfigDict(extra="forbid", title=title),
        __doc__=f"The answer to {endpoint.subject_pattern()} when it worked.",
        ok=(Literal[True], ...),
        result=(endpoint.reply, ...),
    )
    return model


def wire_models() -> list[WireModel]:
    """Every message and record shape on the wire, by schema file stem (sorted)."""
    out = [WireModel(name, (cls,), cls.subject_pattern()) for name, cls in event_types().items()]
    for ep in ENDPOINTS:
        out.append(WireModel(f"{ep.name}.request", (ep.request,), f"{ep.subject_pattern()} (request)"))
        out.append(WireModel(f"{ep.name}.reply", (ok_reply(ep), ErrorReply), f"{ep.subject_pattern()} (reply)"))
    out.append(WireModel("rpc.error", (ErrorReply,), "<prefix>.rpc.*.* (the error reply of every endpoint)"))
    for bucket, (model, where) in BUCKETS.items():
        out.append(WireModel(f"kv.{bucket}", (model,), f"key-value bucket {bucket}: {where}"))
    return sorted(out, key=lambda w: w.name)


def _schema(wire: WireModel) -> dict[str, Any]:
    schema: dict[str, Any] = {"$schema": DRAFT, "$id": schema_id(wire.name), **wire.json_schema()}
    if len(wire.models) == 1 and issubclass(wire.models[0], Event):
        schema["x-cadenza-type"] = wire.models[0].type_name()
    schema["x-cadenza-subject"] = wire.where
    return schema


def json_schemas() -> dict[str, str]:
    """File name -> JSON Schema text for every shape of :func:`wire_models`."""
    return {f"{w.name}.json": json.dumps(_schema(w), indent=2, sort_keys=True) + "\n" for w in wire_models()}


def export_json_schemas(directory: Path = JSON_DIR, *, check: bool = False) -> list[str]:
    """Write (or, with ``check``, compare) the schema files; returns the names that differ.

    In check mode nothing is written; a stale or missing file, or a file for a shape that no
    longer exists, is reported.
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
