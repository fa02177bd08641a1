"""Finding a queue: SPEC's resolution order, read from the environment at call time."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from sqm import config
from sqm.config import QueueSettings, default_rundir, load_config, resolve, resolve_queue
from sqm.errors import ConfigError, SQMError

pytestmark = pytest.mark.timeout(30)

ENV = ("SQM_ENDPOINT", "SQM_CONFIG", "SQM_QUEUE", "SQM_RUNDIR")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture
def full_config(tmp_path) -> str:
    """A config naming an endpoint for queue 'jobs', a top-level one, and another queue."""
    return write(
        tmp_path / "sqm.yaml",
        "endpoint: tcp://10.0.0.1:7000\n"
        "queues:\n"
        "  jobs:\n"
        "    endpoint: tcp://10.0.0.2:7001\n"
        "    max_pending: 5\n"
        "  other:\n"
        "    endpoint: ipc:///srv/other.sock\n",
    )


# --------------------------------------------------------------------------- order


def test_explicit_endpoint_beats_everything(monkeypatch, full_config, tmp_path):
    monkeypatch.setenv("SQM_ENDPOINT", "tcp://10.9.9.9:9999")
    monkeypatch.setenv("SQM_CONFIG", full_config)
    monkeypatch.setenv("SQM_RUNDIR", str(tmp_path))
    s = resolve("jobs", endpoint="tcp://127.0.0.1:5555", config=full_config)
    assert s.endpoint == "tcp://127.0.0.1:5555"
    assert s.queue == "jobs"


def test_env_endpoint_beats_config(monkeypatch, full_config):
    monkeypatch.setenv("SQM_ENDPOINT", "tcp://10.9.9.9:9999")
    assert resolve("jobs", config=full_config).endpoint == "tcp://10.9.9.9:9999"


def test_queue_section_beats_top_level(full_config):
    assert resolve("jobs", config=full_config).endpoint == "tcp://10.0.0.2:7001"
    assert resolve("other", config=full_config).endpoint == "ipc:///srv/other.sock"


def test_top_level_endpoint_when_queue_has_none(full_config, tmp_path):
    assert resolve("unlisted", config=full_config).endpoint == "tcp://10.0.0.1:7000"
    cfg = write(
        tmp_path / "b.yaml",
        "endpoint: tcp://10.0.0.1:7000\nqueues:\n  jobs:\n    max_pending: 3\n",
    )
    assert resolve("jobs", config=cfg).endpoint == "tcp://10.0.0.1:7000"


def test_zero_config_default_uses_sqm_rundir(monkeypatch, tmp_path):
    monkeypatch.setenv("SQM_RUNDIR", str(tmp_path))
    s = resolve("jobs")
    assert s.endpoint == f"ipc://{tmp_path}/jobs.sock"
    assert s.rundir == str(tmp_path)
    assert s.ipc_dir == str(tmp_path)


def test_default_rundir_is_per_user_under_system_temp(monkeypatch):
    base = tempfile.gettempdir()
    mine = default_rundir()
    assert os.path.isabs(mine)
    assert os.path.dirname(mine) == base
    assert resolve("jobs").endpoint == f"ipc://{mine}/jobs.sock"
    real_uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real_uid + 1)  # another user
    other = default_rundir()
    assert other != mine
    assert os.path.dirname(other) == base
    assert resolve("jobs").endpoint == f"ipc://{other}/jobs.sock"


def test_relative_sqm_rundir_is_made_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SQM_RUNDIR", "run")
    assert resolve("q").endpoint == f"ipc://{tmp_path}/run/q.sock"


def test_empty_env_values_count_as_unset(monkeypatch, tmp_path):
    monkeypatch.setenv("SQM_RUNDIR", str(tmp_path))
    monkeypatch.setenv("SQM_ENDPOINT", "")
    monkeypatch.setenv("SQM_CONFIG", "")
    assert resolve("q").endpoint == f"ipc://{tmp_path}/q.sock"


# --------------------------------------------------------------------------- config file


def test_sqm_config_used_when_no_config_given(monkeypatch, full_config):
    monkeypatch.setenv("SQM_CONFIG", full_config)
    s = resolve("jobs")
    assert s.endpoint == "tcp://10.0.0.2:7001"
    assert s.get("max_pending") == 5


def test_explicit_config_beats_sqm_config(monkeypatch, full_config, tmp_path):
    other = write(tmp_path / "other.yaml", "endpoint: tcp://10.5.5.5:1234\n")
    monkeypatch.setenv("SQM_CONFIG", full_config)
    assert resolve("jobs", config=other).endpoint == "tcp://10.5.5.5:1234"


def test_config_may_be_a_dict(monkeypatch, tmp_path):
    monkeypatch.setenv("SQM_RUNDIR", str(tmp_path))
    data = {"queues": {"jobs": {"endpoint": "tcp://127.0.0.1:6000"}}}
    assert resolve("jobs", config=data).endpoint == "tcp://127.0.0.1:6000"
    assert resolve("else", config=data).endpoint == f"ipc://{tmp_path}/else.sock"
    assert resolve("x", config={}).endpoint == f"ipc://{tmp_path}/x.sock"


def test_options_merge_queue_over_top_level(tmp_path):
    cfg = write(
        tmp_path / "c.yaml",
        "heartbeat: 2\nmax_pending: 10\nqueues:\n  jobs:\n    max_pending: 3\n",
    )
    s = resolve("jobs", config=cfg)
    assert isinstance(s, QueueSettings)
    assert s.get("max_pending") == 3
    assert s.get("heartbeat") == 2
    assert s.get("missing", "dflt") == "dflt"
    assert resolve("other", config=cfg).get("max_pending") == 10


def test_bind_defaults_to_endpoint_and_can_be_set(tmp_path):
    cfg = write(
        tmp_path / "c.yaml",
        "queues:\n"
        "  a:\n    endpoint: tcp://10.0.0.7:5000\n    bind: tcp://*:5000\n"
        "  b:\n    endpoint: tcp://10.0.0.7:5001\n",
    )
    assert resolve("a", config=cfg).bind == "tcp://*:5000"
    assert resolve("b", config=cfg).bind == "tcp://10.0.0.7:5001"
    assert resolve("b", config=cfg).ipc_dir is None


def test_load_config_without_any_config_is_empty(monkeypatch):
    assert load_config() == {}
    assert load_config(None) == {}


def test_empty_config_file_means_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("SQM_RUNDIR", str(tmp_path))
    cfg = write(tmp_path / "empty.yaml", "")
    assert load_config(cfg) == {}
    assert resolve("q", config=cfg).endpoint == f"ipc://{tmp_path}/q.sock"


@pytest.mark.parametrize(
    "text",
    [
        "endpoint: [unclosed\n",  # not YAML
        "key: value\n  bad indent: x\n",  # not YAML
        "- a\n- b\n",  # a list, not a mapping
        "just a string\n",
        "queues: [jobs]\n",  # queues must be a mapping
        "queues: 3\n",
    ],
)
def test_bad_config_file_is_config_error(tmp_path, text):
    cfg = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError):
        resolve("jobs", config=cfg)


def test_queue_section_must_be_a_mapping(tmp_path):
    cfg = write(tmp_path / "bad.yaml", "queues:\n  jobs: tcp://10.0.0.1:5\n")
    with pytest.raises(ConfigError):
        resolve("jobs", config=cfg)


def test_missing_config_file_is_config_error(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        resolve("jobs", config=str(tmp_path / "nope.yaml"))
    monkeypatch.setenv("SQM_CONFIG", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError):
        resolve("jobs")


# --------------------------------------------------------------------------- endpoints


@pytest.mark.parametrize(
    "endpoint",
    ["tcp://127.0.0.1:5555", "tcp://*:5555", "tcp://example.org:80", "ipc:///tmp/q.sock",
     "inproc://q"],  # inproc: in-process tests on a shared zmq.Context (sqm.testing)
)
def test_good_endpoints_are_accepted(endpoint):
    assert resolve("q", endpoint=endpoint).endpoint == endpoint


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://127.0.0.1:80",
        "tcp://127.0.0.1",  # no port
        "tcp://127.0.0.1:port",
        "tcp://:5555/x",
        "ipc://",
        "inproc://",  # no name
        "pgm://eth0;239.192.1.1:5555",  # a zmq transport sqm does not speak
        "udp://127.0.0.1:5",
        "127.0.0.1:5555",
        "tcp://127.0.0.1:5555 ",
    ],
)
def test_bad_explicit_endpoint_is_config_error(endpoint):
    with pytest.raises(ConfigError):
        resolve("q", endpoint=endpoint)


def test_bad_endpoint_from_env_or_config_is_config_error(monkeypatch, tmp_path):
    monkeypatch.setenv("SQM_ENDPOINT", "carrier-pigeon://home")
    with pytest.raises(ConfigError):
        resolve("q")
    monkeypatch.delenv("SQM_ENDPOINT")
    cfg = write(tmp_path / "c.yaml", "queues:\n  q:\n    endpoint: nowhere\n")
    with pytest.raises(ConfigError):
        resolve("q", config=cfg)
    cfg = write(tmp_path / "d.yaml", "endpoint: 5\n")
    with pytest.raises(ConfigError):
        resolve("q", config=cfg)


# --------------------------------------------------------------------------- queue name


def test_queue_from_argument_beats_sqm_queue(monkeypatch, tmp_path):
    monkeypatch.setenv("SQM_RUNDIR", str(tmp_path))
    monkeypatch.setenv("SQM_QUEUE", "fromenv")
    assert resolve("fromarg").queue == "fromarg"
    assert resolve_queue("fromarg") == "fromarg"


def test_sqm_queue_fallback(monkeypatch, tmp_path):
    monkeypatch.setenv("SQM_RUNDIR", str(tmp_path))
    monkeypatch.setenv("SQM_QUEUE", "fromenv")
    s = resolve()
    assert s.queue == "fromenv"
    assert s.endpoint == f"ipc://{tmp_path}/fromenv.sock"
    assert resolve_queue(None) == "fromenv"


def test_no_queue_is_a_clear_config_error():
    with pytest.raises(ConfigError, match="SQM_QUEUE"):
        resolve()
    with pytest.raises(ConfigError):
        resolve_queue(None)
    with pytest.raises(ConfigError):
        resolve("")


@pytest.mark.parametrize("name", ["../etc", "a/b", "with space", "-dash", "", "x" * 101, "é"])
def test_invalid_queue_names_are_refused(name):
    with pytest.raises(ConfigError):
        resolve_queue(name or None)


@pytest.mark.parametrize("name", ["q", "jobs.v2", "my_queue-1", "Q9", "x" * 100])
def test_valid_queue_names(name):
    assert resolve_queue(name) == name


# --------------------------------------------------------------------------- call time


def test_environment_is_read_at_call_time(monkeypatch, tmp_path, full_config):
    """Setting variables after import (and between calls) changes the answer."""
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("SQM_RUNDIR", str(a))
    assert resolve("q").endpoint == f"ipc://{a}/q.sock"
    assert default_rundir() == str(a)
    monkeypatch.setenv("SQM_RUNDIR", str(b))
    assert resolve("q").endpoint == f"ipc://{b}/q.sock"
    monkeypatch.setenv("SQM_CONFIG", full_config)
    assert resolve("jobs").endpoint == "tcp://10.0.0.2:7001"
    monkeypatch.setenv("SQM_ENDPOINT", "tcp://10.1.1.1:1")
    assert resolve("jobs").endpoint == "tcp://10.1.1.1:1"
    monkeypatch.delenv("SQM_ENDPOINT")
    monkeypatch.delenv("SQM_CONFIG")
    assert resolve("jobs").endpoint == f"ipc://{b}/jobs.sock"
    monkeypatch.setenv("SQM_QUEUE", "late")
    assert resolve().queue == "late"


def test_config_error_is_an_sqm_error():
    assert issubclass(ConfigError, SQMError)
    assert config.ConfigError is ConfigError
