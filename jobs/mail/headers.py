"""Validators shared by job arguments: header values must never smuggle in new header lines."""

import re

# RFC 5322 field names, restricted to the printable ASCII subset people actually use.
HEADER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,75}$")

# Headers a sender may set besides X-*: list and thread headers, and the flags that tell
# auto-responders to stay quiet. Everything else is refused by name: a denylist let
# Authentication-Results, DKIM-Signature, Delivered-To, Resent-Sender and the like through.
ALLOWED_HEADERS = frozenset(
    name.lower()
    for name in (
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
        "List-Id",
        "List-Help",
        "List-Archive",
        "List-Owner",
        "List-Post",
        "List-Subscribe",
        "Precedence",
        "Auto-Submitted",
        "In-Reply-To",
        "References",
        "Keywords",
        "Comments",
        "Importance",
        "Priority",
    )
)


def single_line(value: str) -> str:
    """Reject CR, LF and other line breaks: they would start a new header (header injection)."""
    if any(ch in value for ch in "\r\n\x00\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"):
        raise ValueError("must be a single line (no CR, LF or other line breaks)")
    return value


def header_name(name: str) -> str:
    if not HEADER_NAME.match(name):
        raise ValueError(f"invalid header name {name!r}: use letters, digits and '-'")
    lowered = name.lower()
    if not (lowered.startswith("x-") or lowered in ALLOWED_HEADERS):
        allowed = ", ".join(sorted(ALLOWED_HEADERS))
        raise ValueError(f"header {name!r} is not allowed: use X-* or one of {allowed}")
    return name
