"""The broker's plugin seam (sqm.plugins), driven through a real in-process broker."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import zmq

from sender import Sender
from sqm.core import Message
from sqm.journal import Journal, JournalPlugin
from sqm.journal_log import read_live
from sqm.plugins import Hooks, Plugin
from sqm.testing import InProcessBroker
from tests.conftest import wait_for
from worker import Worker

pytestmark = pytest.mark.timeout(30)


class Recorder(Plugin):
    """Records every hook call (from the broker thread; read after a wait_for)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.lock = threading.Lock()

    def _note(self, name: str, arg: Any = None) -> None:
        with self.lock:
            self.calls.append((name, arg))

    def names(self) -> list[str]:
        with self.lock:
            return [n for n, _ in self.calls]

    def recover(self, server, now):
        self._note("recover", server.name)

    def accepted(self, server, msg: Message):
        self._note("accepted", msg.id)

    def ended(self, server, msg: Message, outcome: str):
        self._note("ended", (msg.id, outcome))

    def before_acks(self, server):
        self._note("before_acks")

    def status(self, server, data):
        data["recorder"] = len(self.calls)

    def control_commands(self):
        return {"hello-plugin": lambda server, now, req: {"ok": True, "queue": server.name}}

    def closing(self, server):
        self._note("closing", server.name)


def _serve(b: InProcessBroker) -> tuple[Worker, threading.Thread]:
    w = Worker("q", endpoint=b.endpoint, context=b.context, callbacks={"echo": lambda w, o, x: x})
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    wait_for(lambda: b.status()["workers_current"] == 1, 10, "the worker to register")
    return w, t


def test_no_plugin_means_no_hooks_and_no_end_tracking():
    hooks = Hooks()
    assert not (hooks.accepted or hooks.ended or hooks.before_acks or hooks.admit)
    with InProcessBroker("q") as b:
        (server,) = b.broker.queues
        assert server.core.track_ends is False and server.acks_after_hooks is False
        assert b.status()["journal"] is None


def test_only_overridden_hooks_are_collected():
    class OnlyStatus(Plugin):
        def status(self, server, data):
            data["x"] = 1

    hooks = Hooks([OnlyStatus()])
    assert len(hooks.status) == 1 and not hooks.accepted and not hooks.ended
    assert not hooks.batching


def test_hooks_run_in_order_for_one_rpc():
    rec = Recorder()
    with InProcessBroker("q", plugins=[rec]) as b:
        w, t = _serve(b)
        try:
            with Sender("q", endpoint=b.endpoint, context=b.context) as s:
                assert s.rpc("echo", "x", timeout=10) == "x"
            wait_for(lambda: "ended" in rec.names(), 10, "the ended hook")
            st = b.status()
            assert st["recorder"] > 0  # the status hook added its field
            assert b.control("hello-plugin") == {"ok": True, "queue": "q"}
            unknown = b.control("nope")
            assert unknown["ok"] is False and "hello-plugin" in unknown["error"]
        finally:
            w.terminate()
            t.join(10)
    names = rec.names()
    assert names[0] == "recover" and names[-1] == "closing"
    (mid,) = [a for n, a in rec.calls if n == "accepted"]
    assert [a for n, a in rec.calls if n == "ended"] == [(mid, "completed")]
    # after the accept, a batch ends (before_acks: e.g. a commit) before the message can end
    accepted_at = names.index("accepted")
    assert accepted_at < names.index("before_acks", accepted_at) < names.index("ended")


def test_admit_can_refuse_a_command_per_peer():
    class NoStatus(Plugin):
        def __init__(self) -> None:
            self.refused = 0

        def admit(self, server, peer: zmq.Frame, command: bytes) -> bool:
            if command == b"?":
                self.refused += 1
                return False
            return True

    gate = NoStatus()
    with InProcessBroker("q", plugins=[gate]) as b:
        with pytest.raises(TimeoutError):
            b.status(timeout=0.5)
        assert gate.refused == 1
        assert b.control("workers")["ok"] is True  # other commands still pass


def test_journal_plugin_records_on_accept_and_forgets_on_end(tmp_path):
    path = tmp_path / "q.journal"
    journal = Journal(str(path))
    with InProcessBroker("q", journal=journal) as b:
        (server,) = b.broker.queues
        assert server.core.track_ends and server.hooks.batching
        assert any(isinstance(p, JournalPlugin) for p in server.hooks.plugins)
        with Sender("q", endpoint=b.endpoint, context=b.context) as s:
            s.submit("echo", "kept")
            wait_for(lambda: b.status()["journal"]["written_total"] == 1, 10, "the journal row")
            assert len(read_live(f"{path}-messages")) == 1
            w, t = _serve(b)
            try:
                wait_for(lambda: b.status()["completed_total"] == 1, 10, "the completion")
                wait_for(lambda: read_live(f"{path}-messages") == {}, 10,
                         "the record to be ended")
            finally:
                w.terminate()
                t.join(10)
    assert journal.closed
