"""How asyncjobs signs what it sends (completion webhooks, HTTP jobs), and how a receiver checks it.

Each request carries

    X-Asyncjobs-Timestamp: <unix seconds when it was signed>
    X-Asyncjobs-Signature: sha256=<hex HMAC-SHA256 of f"{timestamp}.".encode() + raw body>

The timestamp is inside the signed bytes, so a receiver that refuses old timestamps refuses a
captured request replayed later; within the tolerance, deduplicate by `X-Asyncjobs-Job-Id`
(and `X-Asyncjobs-Try` for HTTP jobs). A receiver in Python:

    from asyncjobs.signing import verify_request

    if not verify_request(secret, request.headers, raw_body):
        return 401
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

TIMESTAMP_HEADER = "X-Asyncjobs-Timestamp"
SIGNATURE_HEADER = "X-Asyncjobs-Signature"
JOB_ID_HEADER = "X-Asyncjobs-Job-Id"
TRY_HEADER = "X-Asyncjobs-Try"
# How far a timestamp may be from the receiver's clock, either way (clocks differ a little).
DEFAULT_TOLERANCE_S = 300
SCHEME = "sha256="


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def sign(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """The signature header's value for `body` signed at `timestamp` (unix seconds)."""
    message = f"{timestamp}.".encode() + body
    return SCHEME + hmac.new(_key(secret), message, hashlib.sha256).hexdigest()


def signed_headers(
    secret: str | bytes, body: bytes, timestamp: int | None = None
) -> dict[str, str]:
    """The two headers to send with `body`, signed now (or at `timestamp`)."""
    when = int(time.time()) if timestamp is None else timestamp
    return {TIMESTAMP_HEADER: str(when), SIGNATURE_HEADER: sign(secret, when, body)}


def verify(
    secret: str | bytes,
    timestamp: str | int | None,
    body: bytes,
    signature: str | None,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """Whether `signature` signs `body` at `timestamp` with `secret`, and `timestamp` is within
    `tolerance_s` of now: False for a missing, malformed, forged or too old (replayed) one."""
    if timestamp is None or signature is None:
        return False
    try:
        when = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - when) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, when, body), signature.strip())


def verify_request(
    secret: str | bytes,
    headers: Mapping[str, str],
    body: bytes,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """`verify` with the two headers read from a request's (case-insensitive) header mapping:
    aiohttp's, Starlette's, Django's `request.headers`, Flask's."""
    return verify(
        secret,
        headers.get(TIMESTAMP_HEADER),
        body,
        headers.get(SIGNATURE_HEADER),
        tolerance_s,
        now,
    )
