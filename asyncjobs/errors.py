"""Errors that job code raises, classified so the worker knows whether trying again can help."""


class JobError(Exception):
    """A job failed for a reason worth showing to the user as-is."""


class PermanentJobError(JobError):
    """Trying again will fail the same way (bad address, 404, page too large, forbidden target)."""


class TransientJobError(JobError):
    """The failure may go away by itself (timeout, connection reset, HTTP 5xx, SMTP 4xx)."""

    # False: `retry_after` is when to try again, not a floor under the family's backoff
    backoff = True
    # False: the cause is told elsewhere at most once a minute (an SMTP configuration failure
    # fails every email alike), so each retry is logged at INFO, not as a warning of its own
    warn_each_try = True

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # seconds the remote side asked us to wait, if it did


class Postpone(Exception):
    """Not a failure: run the job again `delay` seconds from now, and do not count this run as
    a try (a scrape waiting its turn at a polite host gives its worker slot back this way)."""

    def __init__(self, delay: float, reason: str) -> None:
        super().__init__(reason)
        self.delay = max(0.0, delay)
