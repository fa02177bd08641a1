"""Payload serializers: round trips, the pickle opt-in, lookups and registration."""

from __future__ import annotations

import datetime
import pickle

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sqm import serializers
from sqm.errors import SerializerError, SQMError

pytestmark = pytest.mark.timeout(30)

PORTABLE = [
    None,
    True,
    False,
    0,
    -1,
    2**40,
    3.5,
    "",
    "plain",
    "ünïcødé ✓ 日本",
    [],
    [1, "two", 3.0, None, [4, [5]]],
    {},
    {"name": "value", "n": 1, "nested": {"list": [1, 2, {"deep": True}]}, "empty": []},
]


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so registrations here don't leak."""
    monkeypatch.setattr(serializers, "_REGISTRY", dict(serializers._REGISTRY))
    return serializers


def test_builtin_names():
    assert {"cbor", "json", "yaml", "pickle"} <= set(serializers.names())
    assert serializers.names() == sorted(serializers.names())
    assert serializers.DEFAULT == "cbor"


@pytest.mark.parametrize("name", ["cbor", "json", "yaml"])
@pytest.mark.parametrize("value", PORTABLE, ids=repr)
def test_round_trip_portable_values(name, value):
    ser = serializers.get(name)
    assert ser.name == name
    data = ser.dumps(value)
    assert isinstance(data, bytes)
    back = ser.loads(data)
    assert back == value
    assert type(back) is type(value)


# Values every portable serializer must carry unchanged: JSON's data model.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@pytest.mark.parametrize("name", ["cbor", "json", "yaml"])
@settings(max_examples=300, deadline=None, database=None)
@given(value=json_values)
@example(value="line\x85next")  # U+0085 NEXT LINE
@example(value={"k\u2028": ["\ufeff", "\r\n", "\t", "\x00"]})
def test_round_trip_generated_values(name, value):
    ser = serializers.get(name)
    assert ser.loads(ser.dumps(value)) == value


@pytest.mark.parametrize("value", PORTABLE, ids=repr)
def test_round_trip_pickle_when_allowed(value):
    ser = serializers.get("pickle", allow_pickle=True)
    data = ser.dumps(value)
    assert isinstance(data, bytes)
    assert ser.loads(data) == value


def test_pickle_keeps_python_types():
    ser = serializers.get("pickle", allow_pickle=True)
    value = {"t": (1, 2), "s": {3, 4}, "b": b"\x00\xff", "d": datetime.date(2024, 1, 2)}
    assert ser.loads(ser.dumps(value)) == value
    assert pickle.loads(ser.dumps(value)) == value  # it is really pickle


def test_cbor_keeps_bytes():
    ser = serializers.get("cbor")
    assert ser.loads(ser.dumps({"raw": b"\x00\x01\xff"})) == {"raw": b"\x00\x01\xff"}


def test_json_is_json_text():
    data = serializers.get("json").dumps({"a": [1, "é"]})
    assert data.decode("utf-8") == '{"a":[1,"é"]}'


def test_yaml_is_yaml_text():
    data = serializers.get("yaml").dumps({"a": 1})
    assert data.decode() == "a: 1\n"


def test_yaml_loads_is_safe():
    with pytest.raises(yaml.YAMLError):
        serializers.get("yaml").loads(b"!!python/object/apply:os.getcwd []\n")


def test_pickle_refused_without_opt_in():
    with pytest.raises(SerializerError, match="allow_pickle"):
        serializers.get("pickle")
    with pytest.raises(SerializerError):
        serializers.get("pickle", allow_pickle=False)
    assert issubclass(SerializerError, SQMError)


def test_unknown_serializer():
    with pytest.raises(SerializerError, match="msgpack-nope"):
        serializers.get("msgpack-nope")
    with pytest.raises(SerializerError):
        serializers.get("")
    with pytest.raises(SerializerError):
        serializers.get("JSON")  # names are case-sensitive


def test_register_custom(registry):
    def dumps(obj):
        return ("<" + ",".join(obj) + ">").encode()

    def loads(data):
        return data.decode()[1:-1].split(",")

    assert "angle" not in registry.names()
    registry.register("angle", dumps, loads)
    assert "angle" in registry.names()
    ser = registry.get("angle")
    assert ser.name == "angle"
    assert ser.dumps(["a", "b"]) == b"<a,b>"
    assert ser.loads(b"<x,y,z>") == ["x", "y", "z"]


def test_register_replaces(registry):
    registry.register("mine", lambda o: b"one", lambda d: 1)
    registry.register("mine", lambda o: b"two", lambda d: 2)
    ser = registry.get("mine")
    assert ser.dumps(None) == b"two"
    assert ser.loads(b"") == 2
    assert registry.names().count("mine") == 1


def test_registered_pickle_lookalike_is_still_refused(registry):
    # replacing pickle's implementation does not lift the opt-in requirement
    registry.register("pickle", lambda o: b"", lambda d: None)
    with pytest.raises(SerializerError):
        registry.get("pickle")
    assert registry.get("pickle", allow_pickle=True).dumps(1) == b""


@pytest.mark.parametrize("name", ["", "x" * 33, "naïve", "tab\there", "nl\n"])
def test_register_rejects_bad_names(registry, name):
    before = registry.names()
    with pytest.raises(ValueError):
        registry.register(name, lambda o: b"", lambda d: None)
    assert registry.names() == before


def test_register_accepts_32_byte_name(registry):
    name = "n" * 32
    registry.register(name, lambda o: b"", lambda d: None)
    assert name in registry.names()


def test_registry_fixture_does_not_leak():
    assert "angle" not in serializers.names()
    assert "mine" not in serializers.names()
