"""Validators shared by job arguments: header values must never smuggle in new header lines."""

import re

# RFC 5322 field names, restricted to the printable ASCII subset people actually use.
HEADER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,75}$")

# Headers the service writes itself; a caller must not override or duplicate them.
RESERVED_HEADERS = frozenset(
    name.lower()
    for name in (
        "From",
        "To",
        "Cc",
        "Bcc",
        "Subject",
        "Reply-To",
        "Sender",
        "Date",
        "Message-ID",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Content-Disposition",
        "Return-Path",
        "Received",
        "Resent-From",
        "Resent-To",
        "Resent-Cc",
        "Resent-Bcc",
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
    if name.lower() in RESERVED_HEADERS:
        raise ValueError(f"header {name!r} is set by the service and cannot be overridden")
    return name
