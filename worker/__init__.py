"""Workers: serve an sqm queue with a dict of callbacks.

>>> from worker import Worker
>>> def myfunc(worker, originator, payload):
...     worker.respond(originator, {"response": "I heard you!"})
>>> w = Worker("myqueue", callbacks={"myfunc": myfunc})   # doctest: +SKIP
>>> w.run()                                              # doctest: +SKIP
"""

from sqm.errors import Cancelled, TimeLimitExceeded

from .core import Originator, Worker
from .retry import Retry

__all__ = ["Cancelled", "Originator", "Retry", "TimeLimitExceeded", "Worker"]
