"""Validators shared by job arguments: header values must never smuggle in new header lines;
and how values are written so that every header line stays within 998 bytes (RFC 5322)."""

import re
from collections.abc import Sequence
from email.charset import Charset
from email.header import Header

from asyncjobs.addresses import Mailbox

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


# --- writing values (compat32) -----------------------------------------------------------------
# RFC 5322 atext: a display name of such words, one space apart, needs no quotes
_ATOMS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_UTF8 = Charset("utf-8")
# UTF-8 bytes per encoded word: 45 make 60 base64 characters, 72 with "=?utf-8?b?" and "?="
# (RFC 2047: at most 75)
_WORD_BYTES = 45
# A run without whitespace this long cannot be folded: on a line of its own (after the
# header's name) it would pass 998 bytes. Encoded words can be cut anywhere instead.
_UNFOLDABLE = re.compile(r"\S{900,}")


def encoded_words(text: str) -> str:
    """`text` as RFC 2047 encoded words (UTF-8), each within 75 characters, one space apart
    (a decoder drops the space between two encoded words); cut between characters."""
    words: list[str] = []
    chunk: list[str] = []
    size = 0
    for char in text:
        length = len(char.encode())
        if chunk and size + length > _WORD_BYTES:
            words.append(_UTF8.header_encode("".join(chunk)))
            chunk, size = [], 0
        chunk.append(char)
        size += length
    if chunk:
        words.append(_UTF8.header_encode("".join(chunk)))
    return " ".join(words)


def display_name(name: str) -> str:
    """A display name as a header writes it: words as they are, anything else quoted, and
    non-ASCII (or what a reader would take for an encoded word) as encoded words."""
    if not name.isascii() or "=?" in name:
        return encoded_words(name)
    if _ATOMS.fullmatch(name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_mailbox(mailbox: str) -> str:
    """`Name <address>` for a Mailbox with a name, else the address (ASCII addresses only:
    the compat32 path; see jobs.mail.email.build_message)."""
    name = mailbox.name if isinstance(mailbox, Mailbox) else None
    return f"{display_name(name)} <{mailbox}>" if name else str(mailbox)


def address_list(mailboxes: Sequence[str]) -> str:
    """An address header's value: compat32 folds it after a comma or inside a name (at a
    space, which unfolding keeps), never inside an address."""
    return ", ".join(map(format_mailbox, mailboxes))


def header_value(name: str, value: str) -> str | Header:
    """Any other header's value for compat32: as it is when ASCII and foldable within 998
    bytes a line; else encoded words, which fold anywhere."""
    if value.isascii() and not _UNFOLDABLE.search(value):
        return value
    return Header(value, "utf-8", header_name=name)
