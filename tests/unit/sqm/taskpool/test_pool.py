"""The pure parts of the task pool API: search rules, signal names, output tails, K=V pairs."""

from __future__ import annotations

import signal
from pathlib import Path

import click
import pytest

from sqm.taskpool.cli import pairs
from sqm.taskpool.pool import matches, selects, tail_file
from sqm.taskpool.signals import signal_number

INFO = {"pid": 10, "state": "running", "meta": {"name": "foo", "deep": {"a": 1, "b": [1, 2]}}}


def test_matches_recursively():
    assert matches({}, INFO)
    assert matches({"meta": {"name": "foo"}}, INFO)
    assert matches({"meta": {"deep": {"b": [1, 2]}}, "state": "running"}, INFO)
    assert not matches({"meta": {"deep": {"a": 2}}}, INFO)
    assert not matches({"meta": {"other": None}}, INFO)  # absent is not None
    assert not matches({"meta": "foo"}, INFO)
    assert not matches({"pid": {"x": 1}}, INFO)  # a dict pattern against a scalar


def test_selects_functions_and_none():
    assert selects(None, INFO)
    assert selects(lambda i: i["pid"] == 10, INFO)
    assert not selects(lambda i: i["nope"], INFO)  # raising is no match
    assert not selects(lambda i: 0, INFO)


def test_signal_names():
    assert signal_number("INT") == signal_number("SIGINT") == signal_number("2") == signal.SIGINT
    assert signal_number(" hup ") == signal.SIGHUP and signal_number(15) == signal.SIGTERM
    for bad in ("NOPE", "999", 999, ""):
        with pytest.raises(ValueError):
            signal_number(bad)


def test_tail_file_reads_across_rotated_files(tmp_path: Path):
    out = tmp_path / "1.out"
    (tmp_path / "1.out.2").write_bytes(b"aaaa")
    (tmp_path / "1.out.1").write_bytes(b"bbbb")
    out.write_bytes(b"cc")
    assert tail_file(str(out), 3) == b"bcc"
    assert tail_file(str(out), 7) == b"abbbbcc"
    assert tail_file(str(out), 100) == b"aaaabbbbcc"
    assert tail_file(str(tmp_path / "none.out"), 10) == b""


def test_pairs():
    assert pairs(("a=1", "b=x=y", "c="), "--meta") == {"a": "1", "b": "x=y", "c": ""}
    for bad in ("a", "=1"):
        with pytest.raises(click.BadParameter):
            pairs((bad,), "--meta")
