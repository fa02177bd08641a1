"""Fuzz everything sqm parses from the network: ``python -m bench.fuzz``.

Two parts:

- **core** (default ``--inputs 1000000``): each input is turned into one
  multi-frame message from one of a few peers (SUBMIT with real or broken
  envelopes and mailboxes, HELLO, DONE, NACK, CREDIT, heartbeats with
  self-reports, CONTROL requests, BYE, unknown commands, junk frames) and
  handed to a real :class:`~sqm.broker.server.QueueServer` (its wire readers
  and core, the SecurityPlugin's admit checks on every other input), plus
  journal rows read back through the JournalPlugin's recovery. Only the
  documented rejections may happen (Malformed, counted); any other
  exception, or a broken invariant of the core, is a crash. Coverage-guided
  with atheris when it is installed (``pip install atheris``), else a
  seeded random + mutation driver over the same input decoder.
- **live** (``--live N``): N random and mutated multi-frame messages sent
  over tcp to a running secured sqm (from unauthenticated, unknown-key,
  sender-key and worker-key peers) and to an insecure one; afterwards a
  real Sender still gets correct replies through a real worker.

The figures go to docs/GUARANTEES.md ("inputs tried, crashes: 0").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from sqm import protocol
from sqm.broker.server import BrokerOptions, QueueServer
from sqm.config import resolve
from sqm.core import Message
from sqm.journal import JournalPlugin, Recovered
from sqm.plugins import Hooks, Plugin
from sqm.security.plugin import SecurityPlugin

PEERS = [b"Wfuzz-a", b"Wfuzz-b", b"S-sender", b"\x00\x01\x02\x03\x04"]
#: The secured harness's roles (as the ZAP User-Id would say): a worker, an
#: admin, a sender, and a peer with no role at all.
ROLE_OF = {PEERS[0]: "worker", PEERS[1]: "admin", PEERS[2]: "sender"}
COMMANDS = [protocol.SUBMIT, protocol.HELLO, protocol.DONE, protocol.DONE_FAILED,
            protocol.HEARTBEAT, protocol.BYE, protocol.NACK, protocol.CREDIT,
            protocol.STATUS, protocol.CONTROL, b"M", b"V"]
CONTROL_NAMES = ["status", "workers", "drain", "resume", "purge", "stop-worker", "shutdown",
                 "nope", ""]
METHODS = [b"echo", b"echo", b"add", b"echo", b"add", b"", b"x" * 300, "é".encode()]


class Crash(AssertionError):
    """An input made sqm raise something undocumented or broke an invariant."""


class Provider:
    """Reads choices from the fuzzer's bytes (like atheris' FuzzedDataProvider, but ours)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 1  # past the end: the usual, valid choices
        b = self.data[self.pos]
        self.pos += 1
        return b

    def num(self, n: int) -> int:
        """0 <= value < n."""
        if n <= 256:
            return self.byte() % n
        return (self.byte() << 8 | self.byte()) % n

    def pick(self, seq: list[Any]) -> Any:
        return seq[self.num(len(seq))]

    def flag(self) -> bool:
        return bool(self.byte() & 1)

    def blob(self, max_len: int = 64) -> bytes:
        n = self.num(max_len + 1)
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def text(self, max_len: int = 16) -> str:
        return self.blob(max_len).decode("utf-8", "replace")

    def json_value(self, depth: int = 0) -> Any:
        kind = self.num(8)
        if kind == 0 or depth > 2:
            return self.num(70000) - 1000
        if kind == 1:
            return self.text()
        if kind == 2:
            return None
        if kind == 3:
            return self.flag()
        if kind == 4:
            return [self.json_value(depth + 1) for _ in range(self.num(4))]
        if kind == 5:
            return struct.unpack("!d", self.blob(8).ljust(8, b"\0"))[0] if self.flag() else 1.5
        return {self.text(8): self.json_value(depth + 1) for _ in range(self.num(4))}


# ---------------------------------------------------------------- input -> message


class Harness:
    """One QueueServer (inproc, no peers: every send is counted as dropped) and its checks."""

    def __init__(self, secured: bool) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context.instance()
        self.now = 1_000_000.0
        self.open: set[tuple[bytes, bytes]] = set()  # accepted, not ended: (origin, id)
        self.ever: set[tuple[bytes, bytes]] = set()  # accepted at some point
        checker = _EndsChecker(self)
        plugins: list[Plugin] = [checker]
        self.security = SecurityPlugin(".") if secured else None
        if self.security is not None:
            # hand-made frames carry no ZAP metadata: the User-Id each peer would have
            self.security.user_id_of = lambda peer: ROLE_OF.get(peer.bytes, "")
            plugins.append(self.security)
        self.hooks = Hooks(plugins)
        name = f"fuzz{os.getpid()}{'s' if secured else ''}{next_serial()}"
        settings = resolve(name, endpoint=f"inproc://{name}")
        self.server = QueueServer(self.ctx, settings,
                                  BrokerOptions(heartbeat=1.0, max_pending=50), self.now,
                                  hooks=self.hooks)
        self.inputs = 0
        # The peers exist (inproc DEALERs with those routing ids): dispatches
        # reach them, so messages stay in flight and DONE/NACK find them.
        self.peers = []
        for rid in PEERS:
            sock = self.ctx.socket(zmq.DEALER)
            sock.routing_id = rid
            sock.linger = 0
            sock.rcvhwm = 0
            sock.connect(f"inproc://{name}")
            sock.send_multipart([protocol.SIGNATURE, protocol.STATUS])
            self.peers.append(sock)
        for _ in range(100):  # until sqm knows every peer (it answered each STATUS)
            self.server.read_batch(self.now)
            if all(sock.poll(10) for sock in self.peers):
                break
        else:
            raise RuntimeError("fuzz peers never connected")
        self.discard_replies()

    def discard_replies(self) -> None:
        for sock in self.peers:
            while sock.poll(0):
                sock.recv_multipart()

    def close(self) -> None:
        for sock in self.peers:
            sock.close(0)
        self.server.close()

    def feed(self, data: bytes) -> None:
        """One fuzz input: one message from one peer (and sometimes time passes)."""
        p = Provider(data)
        self.inputs += 1
        if self.inputs % 256 == 0:
            self.discard_replies()
        rid = p.pick(PEERS)
        self.holder: bytes | None = None
        frames = self.frames(p)
        if self.holder is not None and p.num(8):
            rid = self.holder  # mostly from the worker that holds the message
        if p.num(16) == 0:
            self.now += p.num(5000) / 1000.0
            self.server.core.tick(self.now)
        frame = zmq.Frame(rid)
        server = self.server
        try:
            if self.security is not None and len(frames) >= 2:
                if not self.security.admit(server, frame, frames[1]):
                    return
            if len(frames) >= 3 and frames[:2] == [protocol.SIGNATURE, protocol.CONTROL]:
                request = json.loads(frames[2]) if _is_json_object(frames[2]) else None
                if isinstance(request, dict) and request.get("cmd") == "shutdown":
                    return  # answered "ok" and then the loop stops: nothing to fuzz past it
            server.handle(frame, frames, self.now)
            server.flush(self.now)
        except Exception as exc:
            raise Crash(f"{type(exc).__name__}: {exc} on {frames!r}") from exc
        self.check()

    def frames(self, p: Provider) -> list[bytes]:
        shape = p.num(20)
        if shape == 0:  # junk: any number of random frames
            return [p.blob(40) for _ in range(p.num(6))]
        cmd = p.pick(COMMANDS) if shape > 1 else bytes([p.byte()])
        sig = protocol.SIGNATURE if p.num(40) else p.blob(6)
        body: list[bytes]
        if cmd == protocol.SUBMIT:
            body = [self.envelope(p), p.blob(32)]
            if p.num(10) == 0:
                body = body[:p.num(3)] + [p.blob(8) for _ in range(p.num(3))]
        elif cmd == protocol.HELLO:
            info: Any = {"id": p.pick(["w1", "w2", p.text()]),
                         "slots": p.pick([1, 2, 3, p.json_value()]),
                         "host": p.text(), "pid": p.json_value(),
                         "methods": p.pick([["echo", "add"], ["echo"], None, p.json_value()])}
            if p.num(6) == 0:
                info = p.json_value()
            body = [json.dumps(info).encode() if p.num(8) else p.blob()]
        elif cmd in (protocol.DONE, protocol.DONE_FAILED, protocol.NACK):
            held = self.held()
            if held and p.num(4):
                self.holder, mid = p.pick(held)
                body = [mid]
            else:
                body = [p.blob(12)]
        elif cmd == protocol.CREDIT:
            body = [str(p.num(70000) - 5).encode() if p.flag() else p.blob(6)]
        elif cmd == protocol.HEARTBEAT:
            n = p.num(4)
            wid = p.pick(["w1", "w2", p.text()]).encode()
            body = [] if n == 0 else [wid] if n == 1 else [
                wid, json.dumps(p.json_value()).encode() if p.flag() else p.blob()]
        elif cmd == protocol.CONTROL:
            req: Any = {"cmd": p.pick(CONTROL_NAMES), "id": p.pick(["w1", p.text()])}
            if p.num(4) == 0:
                req = p.json_value()
            body = [json.dumps(req).encode() if p.num(8) else p.blob()]
        else:
            body = [p.blob(24) for _ in range(p.num(3))]
        if p.num(24) == 0:  # one more, or one fewer, frame than expected
            body = body[:-1] if body and p.flag() else [*body, p.blob(8)]
        return [sig, cmd, *body]

    def envelope(self, p: Provider) -> bytes:
        if p.num(16) == 0:
            return p.blob(60)
        mid = p.pick([b"m1", b"m2", b"m3", b"m%d" % p.num(1000), p.blob(8) or b"x", b"y" * 129])
        mailbox = p.pick([b"inproc://mbox", b"inproc://mbox", b"ipc:///tmp/fuzz.sock",
                          b"tcp://127.0.0.1:9",
                          b"tcp://10.1.2.3:5000 " + b"k" * 40, b"inproc://mbox " + b"k" * 39,
                          p.blob(40)])
        env = protocol.pack_envelope(p.num(4), p.num(4), p.num(5),
                                     p.pick([0.0, 0.0, self.now + 5, self.now - 1, 1e308]),
                                     mid, mailbox, p.pick(METHODS), p.pick([b"cbor", b"cbor", b"json", b"", b"z" * 33]))
        if p.num(20) == 0 and env:  # flip a byte of the head or the lengths
            i = p.num(min(len(env), 24))
            env = env[:i] + bytes([p.byte()]) + env[i + 1:]
        return env

    def held(self) -> list[tuple[bytes, bytes]]:
        """(worker rid, message id) of every message in flight."""
        return [(rid, mid) for rid, w in self.server.core.workers.items() for mid in w.in_flight]

    # ------------------------------------------------------------ invariants

    def check(self) -> None:
        """The core's invariants (those of tests/unit/sqm/test_properties.py that need no model)."""
        core = self.server.core
        if core.outbox:
            raise Crash("outbox not empty after a flush")
        holders: dict[bytes, bytes] = {}
        total = 0
        for rid, w in core.workers.items():
            if not 0 <= w.free <= w.slots:
                raise Crash(f"worker {rid!r}: free {w.free} outside 0..{w.slots}")
            if not w.leaving and w.free != max(0, w.slots - len(w.in_flight) - w.parked) \
                    and w.state == 0:
                raise Crash(f"worker {rid!r}: free {w.free} != slots - in flight - parked")
            for mid in w.in_flight:
                if mid in holders:
                    raise Crash(f"{mid!r} in flight on two workers")
                holders[mid] = rid
            total += len(w.in_flight)
        if core.in_flight != total:
            raise Crash(f"in_flight {core.in_flight} != {total} held by workers")
        if core.pending < 0:
            raise Crash("negative pending")

    def finish(self) -> None:
        """Shut down: every accepted message not in flight must have ended exactly once."""
        core = self.server.core
        core.shutdown(self.now, fail_pending=True)
        self.server.flush(self.now)
        held = {(m.origin, m.id) for w in core.workers.values() for m in w.in_flight.values()}
        left = self.open - held
        if left:
            raise Crash(f"accepted messages never ended after shutdown: {sorted(left)[:3]!r}")


class _EndsChecker(Plugin):
    """Every accepted message ends exactly once (a re-send of one sqm holds is not new)."""

    def __init__(self, harness: Harness) -> None:
        self.h = harness

    def accepted(self, server: QueueServer, msg: Message) -> None:
        self.h.open.add((msg.origin, msg.id))
        self.h.ever.add((msg.origin, msg.id))

    def ended(self, server: QueueServer, msg: Message, outcome: str) -> None:
        key = (msg.origin, msg.id)
        if key in self.h.open:
            self.h.open.discard(key)
        elif key in self.h.ever:
            raise Crash(f"message {msg.id!r} ended twice (now {outcome})")


def _is_json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except ValueError:
        return False


_serial = iter(range(1, 1 << 62))


def next_serial() -> int:
    return next(_serial)


# ---------------------------------------------------------------- journal rows


class _RowsJournal:
    """What JournalPlugin.recover reads, from fuzzed rows (no sqlite needed)."""

    path = ":fuzz:"

    def __init__(self, rows: list[Recovered]) -> None:
        self.rows = rows

    def load(self, queue: str) -> list[Recovered]:
        return self.rows

    def remove(self, queue: str, mid: bytes) -> None:
        pass

    def commit(self) -> None:
        pass


def feed_journal(harness: Harness, data: bytes) -> None:
    """Journal rows read back: fuzzed rows recovered into the harness's server."""
    p = Provider(data)
    rows = [Recovered(p.blob(10) or b"r", p.pick(PEERS), harness.envelope(p), p.blob(16))
            for _ in range(1 + p.num(3))]
    plugin = JournalPlugin(_RowsJournal(rows))  # type: ignore[arg-type]
    try:
        plugin.recover(harness.server, harness.now)
        harness.server.core.tick(harness.now)
        harness.server.flush(harness.now)
    except Exception as exc:
        raise Crash(f"journal recovery: {type(exc).__name__}: {exc} on {rows!r}") from exc
    harness.check()


# ---------------------------------------------------------------- drivers


SEEDS = [
    b"", b"\x01" * 64, bytes(range(256)),
    b"\x02\x01\x00\x00" + b"\x03" * 60, b"\x01\x02\x02" + b"\x00" * 40,
]


class CoreFuzz:
    """Rotates harnesses (plain and secured) so state stays small and varied."""

    PER_HARNESS = 2000

    def __init__(self) -> None:
        self.count = 0
        self.harness = Harness(secured=False)
        #: What the inputs reached, summed over harnesses (a fuzzer that only
        #: hits "malformed" proves little).
        self.reached = {k: 0 for k in ("accepted", "assigned_total", "completed_total",
                                       "failed_total", "malformed_total", "workers_ever",
                                       "denied_total")}

    def __call__(self, data: bytes) -> None:
        self.count += 1
        h = self.harness
        if self.count % 97 == 0:
            feed_journal(h, data)
        else:
            h.feed(data)
        if h.inputs >= self.PER_HARNESS:
            self._retire(h)
            self.harness = Harness(secured=self.count // self.PER_HARNESS % 2 == 1)

    def _retire(self, h: Harness) -> None:
        h.finish()
        st = h.server.status(h.now)
        self.reached["accepted"] += len(h.ever)
        for k in self.reached:
            if k != "accepted":
                self.reached[k] += int(st.get(k) or 0)
        h.close()

    def close(self) -> None:
        self._retire(self.harness)


def mutate(rng: random.Random, data: bytes) -> bytes:
    """A libFuzzer-like mutation: flip, insert, delete, splice, or fresh random bytes."""
    op = rng.randrange(6)
    b = bytearray(data)
    if op == 0 or not b:
        return rng.randbytes(rng.randrange(1, 200))
    i = rng.randrange(len(b))
    if op == 1:
        b[i] ^= 1 << rng.randrange(8)
    elif op == 2:
        b[i:i] = rng.randbytes(rng.randrange(1, 16))
    elif op == 3:
        del b[i:i + rng.randrange(1, 16)]
    elif op == 4:
        b[i] = rng.randrange(256)
    else:
        j = rng.randrange(len(b))
        b[i:] = b[j:j + rng.randrange(1, 64)] + b[i:]
    return bytes(b[:400])


def run_random(target: Callable[[bytes], None], inputs: int, seed: int) -> int:
    """The driver without atheris: random inputs and mutations of a growing corpus."""
    rng = random.Random(seed)
    corpus = list(SEEDS)
    for n in range(inputs):
        data = mutate(rng, rng.choice(corpus)) if n % 4 else rng.randbytes(rng.randrange(200))
        target(data)
        if n % 50 == 0 and len(corpus) < 5000:
            corpus.append(data)
    return inputs


def atheris_available() -> bool:
    try:
        import atheris  # type: ignore[import-not-found,import-untyped,unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return True


def run_core(inputs: int, seed: int, use_atheris: bool) -> tuple[int, str, dict[str, int]]:
    """``inputs`` fuzz inputs against parser + core; (inputs tried, driver, what they reached).

    libFuzzer ends its process when the runs are done, so the atheris driver
    runs in a child process (:func:`atheris_child`) that reports on stdout.
    """
    if not (use_atheris and atheris_available()):
        fuzz = CoreFuzz()
        run_random(fuzz, inputs, seed)
        fuzz.close()
        return inputs, "random+mutation", fuzz.reached
    out = subprocess.run([sys.executable, "-m", "bench.fuzz", "--atheris-child",
                          "--inputs", str(inputs), "--seed", str(seed)],
                         stdout=subprocess.PIPE, text=True, check=False)
    found = [line for line in out.stdout.splitlines() if line.startswith(CHILD_RESULT)]
    if out.returncode != 0 or not found:
        raise Crash(f"the atheris run failed (exit {out.returncode}): see its output above")
    result = json.loads(found[-1][len(CHILD_RESULT):])
    return int(result["inputs"]), "atheris (libFuzzer, coverage-guided)", result["reached"]


CHILD_RESULT = "ATHERIS-RESULT "


def atheris_child(inputs: int, seed: int) -> None:
    """The atheris run: the last input closes the harness and prints the result."""
    import atheris

    atheris.instrument_all()  # sqm is imported already: instrument what is loaded
    fuzz = CoreFuzz()
    done = [0]

    def target(data: bytes) -> None:
        done[0] += 1
        fuzz(data)
        if done[0] == inputs:
            fuzz.close()
            print(CHILD_RESULT + json.dumps({"inputs": done[0], "reached": fuzz.reached}),
                  flush=True)

    corpus = tempfile.mkdtemp(prefix="sqm-fuzz-")
    for i, s in enumerate(SEEDS):
        Path(corpus, f"seed{i}").write_bytes(s)
    atheris.Setup([sys.argv[0], f"-runs={inputs}", f"-seed={seed or 1}", "-max_len=400",
                   "-print_final_stats=0", corpus], target)
    atheris.Fuzz()


# ---------------------------------------------------------------- live


def run_live(messages: int, seed: int, workdir: str) -> dict[str, Any]:
    """Fuzz a running secured and an insecure sqm; then a real rpc on each must work."""
    from bench.live_fuzz import live_fuzz

    return live_fuzz(messages, seed, workdir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n")[0])
    ap.add_argument("--inputs", type=int, default=1_000_000,
                    help="fuzz inputs against parser + core [1000000]")
    ap.add_argument("--live", type=int, default=50_000,
                    help="messages per live sqm (secured and insecure) [50000]; 0 = skip")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-atheris", action="store_true", help="use the random+mutation driver")
    ap.add_argument("--atheris-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.getLogger("sqm").setLevel(logging.CRITICAL)  # refusals are expected by the million
    if args.atheris_child:
        atheris_child(args.inputs, args.seed)
        return 0
    report: dict[str, Any] = {}
    if args.inputs:
        t0 = time.monotonic()
        tried, driver, reached = run_core(args.inputs, args.seed, not args.no_atheris)
        report["core"] = {"inputs": tried, "crashes": 0, "driver": driver,
                          "seconds": round(time.monotonic() - t0, 1), "reached": reached}
        print(f"parser + core: {tried} inputs tried, crashes: 0 ({driver}, "
              f"{report['core']['seconds']} s)", flush=True)
    if args.live:
        with tempfile.TemporaryDirectory(prefix="sqm-live-fuzz-") as d:
            report["live"] = run_live(args.live, args.seed, d)
        for name, r in report["live"].items():
            print(f"live {name}: {r['sent']} messages from {r['peers']} peers, crashes: 0, "
                  f"then a real rpc: {r['rpc']}", flush=True)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
