"""The README's Security quick start, run as printed (BROKER and the port filled in)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from sqm.sockets import local_address_towards
from tests.conftest import REPO, Cluster, free_port, wait_for


def quick_start() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Security\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_security_quick_start_works_as_printed(cluster: Cluster, rundir: Path) -> None:
    lines = quick_start()
    assert len(lines) == 4
    assert [line.split()[1] for line in lines] == ["keygen", "serve", "worker", "submit"]
    port = str(free_port())
    # the broker's address as another host would use it (a loopback one would make the
    # sender's mailbox loopback too, which sqm refuses on a queue served to the network)
    broker = local_address_towards("192.0.2.1")
    assert broker != "127.0.0.1", "this host needs a non-loopback address"
    lines = [line.replace("BROKER", broker).replace("5555", port) for line in lines]
    work = rundir / "qs"
    work.mkdir()
    env = dict(cluster.env)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    done = subprocess.run(lines[0], shell=True, cwd=work, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        for name, line in (("serve", lines[1]), ("worker", lines[2])):
            log = open(rundir / f"qs-{name}.stderr", "wb")
            logs.append(log)
            procs.append(subprocess.Popen(shlex.split(line), env=env, cwd=work,
                                          stdout=subprocess.DEVNULL, stderr=log,
                                          start_new_session=True))
        _check(procs, lines, work, env, rundir)
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for log in logs:
            log.close()


def _check(procs: list[subprocess.Popen[bytes]], lines: list[str], work: Path,
           env: dict[str, str], rundir: Path) -> None:
    last: list[str] = [""]

    def submitted() -> str | None:
        for proc, name in zip(procs, ("serve", "worker"), strict=True):
            assert proc.poll() is None, (rundir / f"qs-{name}.stderr").read_text()
        out = subprocess.run(shlex.split(lines[3]), cwd=work, env=env, capture_output=True,
                             text=True, timeout=60)
        last[0] = out.stderr
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        assert wait_for(submitted, 30, "the quick start's submit answered") == "3"
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last submit said: {last[0]}") from None
