"""sqm.config: where a queue's path came from, ipc path limits, queue limits."""

from __future__ import annotations

import os

import pytest

from sqm.config import (
    IPC_PATH_MAX,
    MAILBOX_NAME_LEN,
    ipc_path_fits,
    mailbox_dir_fits,
    prepare_ipc,
    queue_limits,
    resolve,
)
from sqm.errors import ConfigError, SQMError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("SQM_ENDPOINT", "SQM_CONFIG", "SQM_QUEUE", "SQM_RUNDIR"):
        monkeypatch.delenv(var, raising=False)


def test_origin_names_where_the_endpoint_came_from(monkeypatch, tmp_path):
    assert resolve("q", endpoint="tcp://h:1").origin == "the endpoint argument"
    assert resolve("q").origin == "the default run directory"
    assert resolve("q", config={"rundir": str(tmp_path)}).origin == "the config's rundir"
    assert resolve("q", config={"queues": {"q": {"endpoint": "tcp://h:2"}}}).origin == (
        "the config's queues.q.endpoint")
    monkeypatch.setenv("SQM_RUNDIR", str(tmp_path))
    assert resolve("q").origin == "$SQM_RUNDIR"
    monkeypatch.setenv("SQM_ENDPOINT", "tcp://h:3")
    assert resolve("q").origin == "$SQM_ENDPOINT"


def test_ipc_path_limit_is_counted_in_bytes():
    assert ipc_path_fits("/" + "a" * (IPC_PATH_MAX - 1))
    assert not ipc_path_fits("/" + "a" * IPC_PATH_MAX)
    assert not ipc_path_fits("ipc:///" + "é" * 60)  # 120 bytes, 60 characters
    assert MAILBOX_NAME_LEN == len("mbox-") + 16 + len(".sock")
    assert mailbox_dir_fits("/" + "d" * (IPC_PATH_MAX - MAILBOX_NAME_LEN - 2))
    assert not mailbox_dir_fits("/" + "d" * (IPC_PATH_MAX - MAILBOX_NAME_LEN - 1))


def test_prepare_ipc_creates_a_private_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("SQM_RUNDIR", str(tmp_path / "run"))
    prepare_ipc(resolve("q"))
    assert (os.stat(tmp_path / "run").st_mode & 0o777) == 0o700


def test_prepare_ipc_names_the_source_of_a_bad_directory(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SQM_RUNDIR", str(blocker / "run"))
    with pytest.raises(ConfigError, match=r"cannot create directory .* \(from \$SQM_RUNDIR\)"):
        prepare_ipc(resolve("q"))


def test_prepare_ipc_ignores_tcp():
    prepare_ipc(resolve("q", endpoint="tcp://127.0.0.1:1"))


def test_queue_limits_option_then_queue_section_then_top_level_then_default():
    st = resolve("q", endpoint="tcp://h:1",
                 config={"max_pending": 7, "heartbeat": "0.5", "queues": {"q": {"max_pending": 9}}})
    assert queue_limits(st, default_max_message_size=100) == {
        "heartbeat": 0.5, "max_pending": 9, "max_message_size": 100, "max_deliveries": None}
    assert queue_limits(st, max_pending=3, max_deliveries=2,
                        default_max_message_size=100)["max_pending"] == 3


@pytest.mark.parametrize("value", ["lots", 0, -1])
def test_queue_limits_refuse_bad_numbers(value):
    st = resolve("q", endpoint="tcp://h:1", config={"max_pending": value})
    with pytest.raises(SQMError, match="max_pending must be"):
        queue_limits(st, default_max_message_size=100)


def test_mailbox_dir_falls_back_to_the_run_directory(monkeypatch, tmp_path):
    from sqm.config import mailbox_dir

    monkeypatch.setenv("SQM_RUNDIR", str(tmp_path))
    assert mailbox_dir(resolve("q")) == str(tmp_path)
    long_dir = "/" + "d" * 90
    assert mailbox_dir(resolve("q", endpoint=f"ipc://{long_dir}/q.sock")) == str(tmp_path)
    monkeypatch.setenv("SQM_RUNDIR", long_dir)
    assert mailbox_dir(resolve("q")) is None
    assert mailbox_dir(resolve("q", endpoint="tcp://h:1")) is None  # no ipc dir, rundir too long
