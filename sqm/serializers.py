"""Pluggable payload serializers, selected per message by a short tag.

The tag travels in the envelope, so a worker answers in the serializer the
sender chose and mixed senders interoperate. sqm itself never calls these.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cbor2
import yaml

from .errors import SerializerError

DEFAULT = "cbor"
UNSAFE = frozenset({"pickle"})


@dataclass(frozen=True)
class Serializer:
    name: str
    dumps: Callable[[Any], bytes]
    loads: Callable[[bytes], Any]


_REGISTRY: dict[str, Serializer] = {}


def register(name: str, dumps: Callable[[Any], bytes], loads: Callable[[bytes], Any]) -> None:
    """Register (or replace) a serializer under ``name`` (ASCII, at most 32 bytes)."""
    if not name or len(name) > 32 or not name.isascii() or not name.isprintable():
        raise ValueError(f"invalid serializer name {name!r}")
    _REGISTRY[name] = Serializer(name, dumps, loads)


def get(name: str, *, allow_pickle: bool = False) -> Serializer:
    """Look up a serializer; pickle is refused unless ``allow_pickle`` (it runs code)."""
    if name in UNSAFE and not allow_pickle:
        raise SerializerError(
            f"serializer {name!r} is refused: it can run arbitrary code; "
            "both ends must opt in with allow_pickle=True"
        )
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SerializerError(
            f"unknown serializer {name!r} (known: {', '.join(sorted(_REGISTRY))})"
        ) from None


def names() -> list[str]:
    return sorted(_REGISTRY)


def _json_dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _yaml_dumps(obj: Any) -> bytes:
    # allow_unicode=False: escaped output round-trips every string (U+0085 included)
    return yaml.safe_dump(obj, allow_unicode=False).encode()


register("cbor", cbor2.dumps, cbor2.loads)
register("json", _json_dumps, json.loads)
register("yaml", _yaml_dumps, yaml.safe_load)
register("pickle", lambda o: pickle.dumps(o, protocol=pickle.HIGHEST_PROTOCOL), pickle.loads)
