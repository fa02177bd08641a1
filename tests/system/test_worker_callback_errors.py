"""A raising callback shows in the worker's own log at debug, with its traceback
(issue 17), whichever runner runs it; at the default level it stays quiet."""

from __future__ import annotations

import pytest

from sender import RemoteError, Sender
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(60)

# (extra worker options, app, method): plain and asyncio runners, sync and async callbacks
CASES = {
    "plain": ((), "tests.apps:callbacks", "boom"),
    "asyncio-thread": (("--concurrency", "2"), "tests.apps:callbacks", "boom"),
    "asyncio-async": ((), "tests.apps.aio:callbacks", "async_boom"),
}


def raised_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "raised" in line and "callback for" in line]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("level", ["debug", "info"])
def test_a_raising_callback_is_logged_at_debug_with_the_traceback(cluster, case, level):
    options, app, method = CASES[case]
    cluster.serve("q")
    w = cluster.worker("q", *options, "--log-level", level, target=app)
    with Sender("q") as s, pytest.raises(RemoteError) as err:
        s.rpc(method, "the payload", timeout=10)
    if level == "info":
        # The worker logs before it answers: had it logged, the line would be there.
        assert not raised_lines(w.stderr), w.stderr
        return
    text = wait_for(lambda: raised_lines(w.stderr) and w.stderr, 10, "the debug line")
    (line,) = raised_lines(text)
    assert " DEBUG " in line and method in line, text
    after = text[text.index(line):]
    assert "Traceback (most recent call last)" in after, text
    assert err.value.type in after, text  # the exception's last line follows
