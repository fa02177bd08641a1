"""Workers: serve an sqm queue with a dict of callbacks.

>>> from worker import Worker
>>> def myfunc(worker, originator, payload):
...     worker.respond(originator, {"response": "I heard you!"})
>>> w = Worker("myqueue", callbacks={"myfunc": myfunc})   # doctest: +SKIP
>>> w.run()                                              # doctest: +SKIP
"""

from sqm.errors import (
    AuthError,
    Cancelled,
    HopLimitExceeded,
    KeyFileError,
    RemoteError,
    SQMError,
    TimeLimitExceeded,
    Timeout,
    WorkerLost,
)

from .core import Originator, Worker
from .retry import Retry

__all__ = [
    "AuthError",
    "Cancelled",
    "HopLimitExceeded",
    "KeyFileError",
    "Originator",
    "RemoteError",
    "Retry",
    "SQMError",
    "TimeLimitExceeded",
    "Timeout",
    "Worker",
    "WorkerLost",
]
