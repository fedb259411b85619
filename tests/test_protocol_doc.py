"""docs/protocol.md names every subject builder, verb, message, field, tag and enum value.

The document is the public contract; these checks keep it from drifting from
``libs/protocol`` (a new field or subject without documentation fails here).
"""

from __future__ import annotations

import enum
import inspect
import re
from pathlib import Path

import msgspec
import pytest

from libs.protocol import messages, subjects

DOC = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()


def _defined_in(module, predicate) -> list:
    return [
        obj
        for name, obj in vars(module).items()
        if not name.startswith("_") and predicate(obj) and getattr(obj, "__module__", None) == module.__name__
    ]


SUBJECT_FUNCTIONS = _defined_in(subjects, inspect.isfunction)
STRUCTS = _defined_in(messages, lambda o: inspect.isclass(o) and issubclass(o, msgspec.Struct))
ENUMS = _defined_in(messages, lambda o: inspect.isclass(o) and issubclass(o, enum.Enum))


def section(name: str) -> str:
    """The text under the ``###`` heading that names ``name`` in backticks, up to the next heading."""
    match = re.search(rf"^###[^\n]*`{re.escape(name)}`[^\n]*\n(.*?)(?=^##)", DOC + "\n##", re.S | re.M)
    assert match, f"docs/protocol.md has no ### section for `{name}`"
    return match.group(1)


def test_the_lists_cover_the_modules():
    # Guards the introspection itself: these must be found, or the checks below check nothing.
    assert {f.__name__ for f in SUBJECT_FUNCTIONS} >= {"node", "node_load", "sched_place", "stream", "request_cancel"}
    assert {c.__name__ for c in STRUCTS} >= {"Message", "LoadReport", "SamplingParams", "ClusterState", "TokenLogprob"}
    assert {e.__name__ for e in ENUMS} == {"Role", "NodeState", "ErrorCode", "EventKind"}


@pytest.mark.parametrize("func", SUBJECT_FUNCTIONS, ids=lambda f: f.__name__)
def test_every_subject_function_is_documented(func):
    assert f"`{func.__name__}(" in DOC


def test_every_subject_string_is_documented():
    concrete = [
        subjects.node_load(), subjects.node_bye(), subjects.sched_place(), subjects.sched_cluster(),
        subjects.sched_events(), subjects.request_cancel(),
    ]
    for subject in concrete:
        assert f"`{subject}`" in DOC
    for verb in subjects.NodeVerb:
        assert f"`{subjects.PREFIX}.node.<node_id>.{verb.value}`" in DOC
        assert f"NodeVerb.{verb.name}" in DOC
    assert f"`{subjects.PREFIX}.stream.<gateway_id>`" in DOC
    assert f"`{subjects.PREFIX}`" in DOC


@pytest.mark.parametrize("cls", [c for c in STRUCTS if c is not messages.Message], ids=lambda c: c.__name__)
def test_every_message_and_field_is_documented(cls):
    text = section(cls.__name__)
    for field_name in cls.__struct_fields__:
        assert f"`{field_name}`" in text, f"{cls.__name__}.{field_name} is not in its section of docs/protocol.md"
    tag = cls.__struct_config__.tag
    if tag is not None:
        heading = re.search(rf"^###[^\n]*`{cls.__name__}` \(type `\"{re.escape(tag)}\"`\)", DOC, re.M)
        assert heading, f"the heading of {cls.__name__} must give its tag (type `\"{tag}\"`)"


def test_every_wire_message_is_in_the_union():
    # A Message subclass missing from AnyMessage could not be decoded by anyone.
    union = set(messages.AnyMessage.__args__)
    tagged = {c for c in STRUCTS if issubclass(c, messages.Message) and c is not messages.Message}
    assert tagged == union


@pytest.mark.parametrize("enum_cls", ENUMS, ids=lambda e: e.__name__)
def test_every_enum_value_is_documented(enum_cls):
    assert f"`{enum_cls.__name__}`" in DOC
    for member in enum_cls:
        assert f"`{member.value}`" in DOC, f"{enum_cls.__name__}.{member.name} ({member.value}) is not documented"


def test_encoding_is_stated():
    assert "MessagePack" in DOC and "tagged union" in DOC and "`type`" in DOC
