"""The Sender's own verdicts when a broker is gone: a started message whose
worker fell silent too (WorkerLost, or a re-send while retries last), and a
stopping broker's BrokerShutdown for a message no worker had started."""

from __future__ import annotations

import time
from typing import Any

import pytest

from sender._correlator import Correlator
from sender._links import DOWN, DOWN_EVENTS, UP, Link, Links
from sqm.config import QueueSettings
from sqm.protocol import ACK, ERROR, RESULT, SIGNATURE, SUBMIT


class FakeSock:
    """What a link's DEALER was asked to send."""

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []


def make(endpoints: tuple[str, ...]) -> tuple[Correlator, Links]:
    settings = QueueSettings("q", endpoints[0], "/tmp", {}, endpoints)
    core = Correlator(settings, serializer="cbor", allow_pickle=False, max_message_size=1 << 20)
    core.set_mailbox("tcp://10.0.0.1:4000")

    def opener(link: Link) -> None:
        link.raw = link.sock = FakeSock()

    links = Links(core, endpoints, opener, lambda link, linger: None, heartbeat=1.0)
    for link in links.links:
        link.state = UP
        link.reached = True
    links.up = list(links.links)
    return core, links


@pytest.fixture(autouse=True)
def fake_send(monkeypatch: pytest.MonkeyPatch) -> None:
    import sender._links as module

    monkeypatch.setattr(module, "send_frames", lambda sock, frames: sock.sent.append(frames))


def submit(core: Correlator, link: Link, retries: int = 0) -> str:
    mid, frames = core.encode_submit("work", None, oneway=False, timeout=30, retries=retries)
    core.sent[mid] = (frames, link, link.epoch)
    return mid


def down(links: Links, link: Link) -> None:
    link.state = DOWN
    links.up = [x for x in links.links if x.state == UP]


def ack(core: Correlator, mid: str, beat: bytes | None = b"1000") -> None:
    frames = [SIGNATURE, ACK, mid.encode()] + ([beat] if beat is not None else [])
    assert core.feed(frames, False) is None


def test_a_silent_worker_of_a_dead_broker_is_worker_lost_after_3_beats() -> None:
    core, links = make(("tcp://10.0.0.2:5555",))
    link = links.links[0]
    mid = submit(core, link)
    ack(core, mid)
    now = time.monotonic()
    down(links, link)
    links.due(now + 2.5)  # silent for less than 3 beats: still waiting
    assert core.take(mid) is None
    ack(core, mid)  # the worker lives: its repeated ACK resets the clock
    links.due(time.monotonic() + 2.9)
    assert core.take(mid) is None
    links.due(time.monotonic() + 3.2)
    outcome = core.take(mid)
    assert outcome is not None and outcome.etype == "WorkerLost" and outcome.from_broker
    assert mid not in core.running and mid not in core.outstanding


def test_a_live_broker_or_an_old_worker_never_draws_the_verdict() -> None:
    core, links = make(("tcp://10.0.0.2:5555",))
    link = links.links[0]
    watched, old = submit(core, link), submit(core, link)
    ack(core, watched)
    ack(core, old, beat=None)  # a worker that never repeats its ACK
    assert old not in core.running
    links.due(time.monotonic() + 60)  # broker UP: it will say WorkerLost itself
    assert core.take(watched) is None
    down(links, link)
    links.due(time.monotonic() + 60)
    assert core.take(old) is None  # nothing known of its worker: wait for the deadline
    assert core.take(watched) is not None


def test_with_a_retry_left_it_is_re_sent_through_a_live_broker_with_one_less() -> None:
    core, links = make(("tcp://10.0.0.2:5555", "tcp://10.0.0.3:5555"))
    first, second = links.links
    mid = submit(core, first, retries=2)
    ack(core, mid)
    down(links, first)
    links.due(time.monotonic() + 3.5)
    assert core.take(mid) is None and mid in core.outstanding
    resent: list[Any] = second.raw.sent
    assert len(resent) == 1 and resent[0][2][1] == 1  # the envelope's retries byte
    assert core.sent[mid][1] is second


def test_a_stopping_broker_s_pending_message_goes_to_the_other_broker() -> None:
    core, links = make(("tcp://10.0.0.2:5555", "tcp://10.0.0.3:5555"))
    first, second = links.links
    mid = submit(core, first)
    error = [SIGNATURE, ERROR, mid.encode(), b"BrokerShutdown", b"sqm stopped", b"{}"]
    assert core.feed(error, True) is None
    links.due(time.monotonic())
    assert core.take(mid) is None
    assert len(second.raw.sent) == 1 and core.sent[mid][1] is second
    # The other one stops too, with no live broker left: the caller hears it.
    error[3:4] = [b"BrokerShutdown"]
    assert core.feed(error, True) is None
    down(links, first)
    links.due(time.monotonic())
    outcome = core.take(mid)
    assert outcome is not None and outcome.etype == "BrokerShutdown"


def test_a_single_broker_sender_passes_broker_shutdown_on_at_once() -> None:
    core, links = make(("tcp://10.0.0.2:5555",))
    mid = submit(core, links.links[0])
    error = [SIGNATURE, ERROR, mid.encode(), b"BrokerShutdown", b"sqm stopped", b"{}"]
    assert core.feed(error, True) == mid


# --- a broker lost while its messages may have started unacknowledged ------------


def submit_ack(core: Correlator, link: Link, ack: bool) -> str:
    mid, frames = core.encode_submit("work", None, oneway=False, timeout=30, retries=0, ack=ack)
    core.sent[mid] = (frames, link, link.epoch)
    return mid


def lose(links: Links, link: Link, now: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """``link``'s broker is gone while another is up (its DEALER is not re-created here)."""
    monkeypatch.setattr(links, "purge", lambda link: None)
    down(links, link)
    link.epoch += 1  # its connection is lost (as Links.event counts it)
    links.rehome(now)


@pytest.mark.parametrize("ack", [True, False])
def test_an_unacknowledged_message_is_re_sent_at_once_only_if_its_worker_acks_at_the_start(
        ack: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    core, links = make(("tcp://10.0.0.2:5555", "tcp://10.0.0.3:5555"))
    a, b = links.links
    mid = submit_ack(core, a, ack)
    now = 100.0
    lose(links, a, now, monkeypatch)
    # FLAG_ACK: no ACK means no worker started it, so another broker gets it now.
    # Without it a worker may run it and say so only at its next beat: held.
    assert len(b.raw.sent) == (1 if ack else 0)
    assert links.due(now + 1.9) == (float("inf") if ack else now + 2.0)  # 2 beats of 1 s
    assert len(b.raw.sent) == (1 if ack else 0)
    links.due(now + 2.0)  # heard nothing for two beats: nobody runs it
    assert len(b.raw.sent) == 1 and b.raw.sent[0][2] == core.sent[mid][0][2]
    assert core.sent[mid][1] is b and not links.held


@pytest.mark.parametrize("heard", ["ack", "result"])
def test_a_held_message_that_turns_out_started_or_answered_is_not_re_sent(
        heard: str, monkeypatch: pytest.MonkeyPatch) -> None:
    core, links = make(("tcp://10.0.0.2:5555", "tcp://10.0.0.3:5555"))
    a, b = links.links
    mid = submit_ack(core, a, False)
    lose(links, a, 100.0, monkeypatch)
    if heard == "ack":  # the worker's beat: it runs it
        ack(core, mid)
        assert mid in core.running
    else:
        assert core.feed([SIGNATURE, RESULT, mid.encode(), b"\xf6"], False) == mid
    links.due(102.5)
    assert b.raw.sent == [] and not links.held


def test_the_hold_lasts_two_of_the_slowest_worker_beats_seen() -> None:
    core, links = make(("tcp://10.0.0.2:5555", "tcp://10.0.0.3:5555"))
    assert links.settle() == 2.0  # the sender's own heartbeat (1 s)
    other = submit_ack(core, links.links[0], True)
    ack(core, other, b"3000")  # a worker beating every 3 s
    assert links.settle() == 6.0


def test_what_an_async_sender_queued_for_a_removed_broker_goes_to_another_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Queued for a batch and never sent: set_endpoints() sends it through a
    remaining broker now (no two-beat hold, no DEALER that never sent it)."""
    core, links = make(("tcp://10.0.0.2:5555", "tcp://10.0.0.3:5555"))
    a, b = links.links
    monkeypatch.setattr(links, "read_all", lambda link: 0)
    mid = submit_ack(core, a, False)
    a.queued.append((mid, core.sent[mid][0]))
    links.replace([b.endpoint], 100.0)
    assert [f[2] for f in b.raw.sent] == [core.sent[mid][0][2]] and a.raw.sent == []
    assert core.sent[mid][1] is b and not links.held and not a.queued


def test_a_batch_goes_as_one_submit_and_a_down_link_s_queue_to_a_live_broker(
        monkeypatch: pytest.MonkeyPatch) -> None:
    core, links = make(("tcp://10.0.0.2:5555", "tcp://10.0.0.3:5555"))
    a, b = links.links
    a.batches = True
    mids = [submit_ack(core, a, False) for _ in range(3)]
    a.queued = [(m, core.sent[m][0]) for m in mids]
    assert links.flush(a) is False
    (one,) = a.raw.sent
    assert one[:2] == [SIGNATURE, SUBMIT] and one[2::2] == [core.sent[m][0][2] for m in mids]
    more = [submit_ack(core, a, False) for _ in range(2)]
    a.queued = [(m, core.sent[m][0]) for m in more]
    monkeypatch.setattr(links, "purge", lambda link: None)
    links.event(a, DOWN_EVENTS, 100.0)  # queued, never sent: to B now, one SUBMIT each
    assert [f[2] for f in b.raw.sent] == [core.sent[m][0][2] for m in more]
    assert not a.batches and not a.queued


def test_a_held_message_is_re_sent_even_if_its_broker_came_back_empty(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A restarted broker (memory mode) no longer has what it ACCEPTED before:
    the reconnect rule re-sends only what it never accepted, so the hold must
    not leave an accepted message to it."""
    core, links = make(("tcp://10.0.0.2:5555", "tcp://10.0.0.3:5555"))
    a, b = links.links
    mid = submit_ack(core, a, False)
    core.accepted.add(mid)  # sqm had it (pending there) when it stopped
    lose(links, a, 100.0, monkeypatch)
    a.state = UP  # back, empty, before the hold is over
    links.up = [a, b]
    links.due(102.0)
    sent = a.raw.sent + b.raw.sent  # through whichever broker is picked: both are up
    assert links.resent == 1 and [f[2] for f in sent] == [core.sent[mid][0][2]]
