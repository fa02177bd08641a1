"""A worker module that registers a custom serializer (for test_messaging)."""

import json

from sqm import serializers
from tests.apps import callbacks  # noqa: F401

serializers.register(
    "rev-json", lambda o: json.dumps(o).encode()[::-1], lambda b: json.loads(b[::-1])
)
