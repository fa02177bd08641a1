"""Exceptions shared by the broker, Sender and Worker.

Every error a caller can see is an :class:`SQMError`, so ``except SQMError``
catches everything this library raises on purpose.
"""

from __future__ import annotations


class SQMError(Exception):
    """Base class of every sqm error."""


class ConfigError(SQMError):
    """The queue name, endpoint or configuration file is missing or invalid."""


class ProtocolError(SQMError):
    """A peer sent frames that do not follow docs/PROTOCOL.md."""


class SerializerError(SQMError):
    """A payload could not be encoded or decoded, or its serializer is refused."""


class Timeout(SQMError, TimeoutError):
    """No reply arrived before the deadline."""


class QueueFull(SQMError):
    """sqm refused the message because the queue's pending limit was reached."""


class MessageTooLarge(SQMError):
    """The encoded payload is larger than the allowed maximum message size."""


class Expired(Timeout):
    """The message's deadline passed before any worker could take it.

    A kind of :class:`Timeout` (and so of ``TimeoutError``): code that
    catches a timeout around an rpc keeps working; code that cares can tell
    "sqm expired it unstarted" apart.
    """


class BrokerShutdown(SQMError):
    """sqm stopped before a worker took the message."""


class Purged(SQMError):
    """An operator purged the queue (``sqm purge``) while the message was pending."""


class WorkerLost(SQMError):
    """The worker holding the message died and no retry was left.

    ``deliveries`` is how many workers the message was handed to.
    """

    def __init__(self, message: str = "worker lost", deliveries: int = 1) -> None:
        super().__init__(message)
        self.deliveries = deliveries


class RemoteError(SQMError):
    """The worker's callback raised, or the method is unknown.

    ``type``, ``message`` and ``traceback`` are strings; ``type`` is the
    exception class name on the worker, or ``"UnknownMethod"``.
    """

    def __init__(self, type: str, message: str, traceback: str = "") -> None:  # noqa: A002
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message
        self.traceback = traceback


#: Error types sqm or a worker may put on the wire, mapped to the exception
#: the Sender raises. Anything else becomes a RemoteError.
BROKER_ERRORS: dict[str, type[SQMError]] = {
    "QueueFull": QueueFull,
    "MessageTooLarge": MessageTooLarge,
    "Expired": Expired,
    "BrokerShutdown": BrokerShutdown,
    "Purged": Purged,
    "Malformed": ProtocolError,
}


class AuthError(SQMError, PermissionError):
    """The broker refused this peer's key (CURVE/ZAP handshake) or its role forbids the action."""


class KeyFileError(SQMError):
    """A CURVE key file is missing, unreadable, malformed or readable by others.

    The message is one line naming the file and the problem.
    """


# sqm answers a forbidden action with an ERROR of this type.
BROKER_ERRORS["AuthError"] = AuthError


class BrokerUnreachable(SQMError, ConnectionError):
    """No broker listens at the queue's endpoint(s): the message never reached sqm.

    Raised promptly for ``ipc://`` endpoints whose socket file is missing or
    refuses connections (a tcp endpoint ends in :class:`Timeout` instead,
    whose message says no broker was reached).
    """


class LockHeld(SQMError):
    """A task pool ``spawn`` found its lockfile held by another live task; nothing was started."""


class TimeLimitExceeded(SQMError):
    """The callback was still running when the message's time limit passed.

    sqm ends the message at the limit (the caller hears promptly, whatever
    the callback does); a late result from the worker is dropped.
    """


class Cancelled(SQMError):
    """The message was cancelled (``Sender.cancel`` or ``sqm cancel``) before it ended."""


#: The error type of the RemoteError a caller gets when a callback kept
#: raising Retry: its message carries the last error's type and message.
RETRIES_EXHAUSTED = "RetriesExhausted"

BROKER_ERRORS["TimeLimitExceeded"] = TimeLimitExceeded
BROKER_ERRORS["Cancelled"] = Cancelled


class HopLimitExceeded(SQMError):
    """``worker.forward`` would hand a message on more than ``max_hops`` times (a loop?)."""
