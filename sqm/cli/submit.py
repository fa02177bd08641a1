"""``sqm submit``: send one message, or one per line of a file, and print the replies."""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, TextIO

import click

from .. import serializers
from ..admin import require_broker
from ..config import resolve
from ..errors import SQMError
from .options import config_option, endpoint_option, key_options, one_line_errors

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar

    from sender import Sender


def _split_submit_args(args: tuple[str, ...], has_input: bool) -> tuple[str | None, str, str | None]:
    """[QUEUE] METHOD [JSON]: the queue may come from $SQM_QUEUE instead."""
    env_queue = os.environ.get("SQM_QUEUE")
    if len(args) == 3:
        return args[0], args[1], args[2]
    if len(args) == 1:
        return None, args[0], None
    if len(args) == 2:
        if env_queue and not has_input and _is_json(args[1]):
            return None, args[0], args[1]
        return args[0], args[1], None
    raise click.UsageError("expected [QUEUE] METHOD [JSON]")


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise SQMError(f"{where} is not valid JSON: {exc}") from None


def _error_json(exc: Exception) -> dict[str, Any]:
    return {"error": {"type": getattr(exc, "type", type(exc).__name__), "message": str(exc)}}


@click.command()
@click.argument("args", nargs=-1, metavar="[QUEUE] METHOD [JSON]")
@endpoint_option
@config_option
@key_options
@click.option(
    "--input",
    "input_file",
    type=click.File("r"),
    help="Send one message per JSON line of FILE (- for stdin); print one reply per line.",
)
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait per reply.")
@click.option("--retries", type=int, default=0, show_default=True, help="Other workers to try if one dies.")
@click.option("--oneway", is_flag=True, help="Expect no reply (prints the message id).")
@click.option(
    "--serializer", default="cbor", show_default=True,
    help="Payload encoding on the wire: cbor, json, yaml or pickle (with --allow-pickle).",
)
@click.option("--allow-pickle", is_flag=True,
              help="Allow the pickle serializer (the worker must allow it too; runs code!).")
@click.option(
    "--concurrency", type=int, default=100, show_default=True, help="Messages in flight with --input."
)
@one_line_errors
def submit(
    args: tuple[str, ...],
    endpoint: str | None,
    config: str | None,
    input_file: TextIO | None,
    timeout: float,
    retries: int,
    oneway: bool,
    serializer: str,
    allow_pickle: bool,
    concurrency: int,
) -> None:
    """Send METHOD with a JSON payload to QUEUE and print the reply as JSON.

    The queue is the first argument, else $SQM_QUEUE. With --input, every
    line of FILE is one JSON payload; replies are printed one per line in
    input order, failures as {"error": {...}}; the exit status is 1 if any
    failed.
    """
    from sender import Sender

    queue, method, payload_text = _split_submit_args(args, input_file is not None)
    if input_file is not None and payload_text is not None:
        raise SQMError("give either a JSON argument or --input, not both")
    settings = resolve(queue, endpoint=endpoint, config=config)
    require_broker(settings)
    serializers.get(serializer, allow_pickle=allow_pickle)
    with Sender(settings.queue, endpoint=settings.endpoints, config=config,
                serializer=serializer, timeout=timeout, allow_pickle=allow_pickle) as s:
        if input_file is None:
            payload = _parse_json(payload_text, "JSON argument") if payload_text else None
            if oneway:
                click.echo(json.dumps(s.submit(method, payload, oneway=True, retries=retries)))
                return
            result = s.rpc(method, payload, timeout=timeout, retries=retries)
            click.echo(json.dumps(result, default=str))
            return
        if concurrency < 1:
            raise click.BadParameter("must be at least 1", param_hint="--concurrency")
        ok = failed = 0
        t0 = time.monotonic()
        if oneway:
            items = _oneway_lines(s, method, input_file, retries)
        else:
            items = _batch_lines(s, method, input_file, timeout, retries, concurrency)
        with _progress_bar(input_file) as bar:
            for item in items:
                if isinstance(item, Exception):
                    failed += 1
                    click.echo(json.dumps(_error_json(item)))
                else:
                    ok += 1
                    click.echo(json.dumps(item, default=str))
                bar.update(1)
        click.echo(batch_summary(ok, failed, time.monotonic() - t0), err=True)
        if failed:
            sys.exit(1)


def batch_summary(ok: int, failed: int, seconds: float) -> str:
    """The last line ``sqm submit --input`` writes on stderr."""
    return f"{ok} ok, {failed} failed in {seconds:.2f} s"


def _input_payloads(lines: Iterable[str], errors: deque[SQMError | None]) -> Iterator[Any]:
    """The JSON payload of every non-blank line. For each line ``errors``
    gets None (sent) or, for a line that is not JSON, the error in its place."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            payload = _parse_json(line, f"input line {n}")
        except SQMError as exc:
            errors.append(exc)
            continue
        errors.append(None)
        yield payload


def _batch_lines(s: Sender, method: str, lines: Iterable[str], timeout: float, retries: int,
                 concurrency: int) -> Iterator[Any]:
    """One message per JSON line through Sender.map; items in input order.

    map reads its input ahead of what it yields, so when it yields the k-th
    reply, the lines up to the k-th sent one are in ``errors``: errors for
    unparsable lines before it come out first, keeping input order.
    """
    errors: deque[SQMError | None] = deque()
    for item in s.map(method, _input_payloads(lines, errors), max_concurrent=concurrency,
                      retries=retries, timeout=timeout):
        while errors[0] is not None:
            yield errors.popleft()
        errors.popleft()
        yield item
    yield from errors  # only parse errors are left


def _oneway_lines(s: Sender, method: str, lines: Iterable[str], retries: int) -> Iterator[Any]:
    """--oneway: submit every line, yield its message id (or its error)."""
    errors: deque[SQMError | None] = deque()
    for payload in _input_payloads(lines, errors):
        while errors[0] is not None:
            yield errors.popleft()
        errors.popleft()
        try:
            yield s.submit(method, payload, oneway=True, retries=retries)
        except SQMError as exc:
            yield exc
    yield from errors


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: int) -> None:
        pass


def _progress_bar(input_file: TextIO) -> _NoBar | ProgressBar[int]:
    """A progress bar on stderr when it is a terminal (the total when the input is a file)."""
    if not sys.stderr.isatty():
        return _NoBar()
    total = None
    try:
        if input_file.seekable():
            total = sum(1 for line in input_file if line.strip())
            input_file.seek(0)
    except (OSError, ValueError):
        total = None
    if total is None:
        return click.progressbar(iter(int, 1), show_pos=True, label="sent", file=sys.stderr)
    return click.progressbar(length=total, show_pos=True, show_percent=True, label="sent",
                             file=sys.stderr)
