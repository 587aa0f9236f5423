"""The wire contract: envelope, subject grammar, JSON Schema files."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import schemas
from schemas import DeadLetter, SubjectError, Subjects


def test_json_schema_files_are_current() -> None:
    assert schemas.export_json_schemas(check=True) == [], "run `cadenza schemas export`"


def test_every_registered_event_has_a_domain_and_a_schema_file() -> None:
    files = schemas.json_schemas()
    for name, cls in schemas.event_types().items():
        assert cls.DOMAIN in schemas.DOMAINS
        assert f"{name}.json" in files
        assert name == f"{cls.DOMAIN}.{cls.EVENT}"


def test_envelope_fills_the_type_and_refuses_another() -> None:
    d = DeadLetter(consumer="c", subject="s", reason="r", error_type="bad_json")
    assert d.type == "dlq.rejected" and d.schema_version == 1 and d.time.tzinfo is not None
    with pytest.raises(ValueError, match=r"type is 'activity\.started'"):
        DeadLetter.model_validate({**d.model_dump(), "type": "activity.started"})


def test_subjects_build_and_parse_round_trip() -> None:
    s = Subjects("acme.cadenza")
    subject = s.build("activity", "a-1", "message")
    assert subject == "acme.cadenza.activity.a-1.message"
    parts = s.parse(subject)
    assert (parts.prefix, parts.domain, parts.id, parts.event) == ("acme.cadenza", "activity", "a-1", "message")
    assert s.filter("activity") == "acme.cadenza.activity.*.*"
    assert s.domain_wildcard("task") == "acme.cadenza.task.>"


@pytest.mark.parametrize("bad", ["", "a.b", "a b", "*", ">", "x" * 201, "é"])
def test_subject_tokens_that_would_change_the_grammar_are_refused(bad: str) -> None:
    with pytest.raises(SubjectError):
        Subjects().build("activity", bad, "started")


@given(st.text(max_size=60))
def test_parse_never_crashes_on_arbitrary_subjects(text: str) -> None:
    try:
        parts = Subjects().parse(text)
    except SubjectError:
        return
    assert Subjects().build(parts.domain, parts.id, parts.event) == text


def test_unknown_domain_is_refused() -> None:
    with pytest.raises(SubjectError, match="unknown domain"):
        Subjects().build("nope", "a", "b")
