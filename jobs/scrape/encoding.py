"""A page's text encoding, chosen as a browser chooses it (the WHATWG encoding-sniffing order,
simplified): a byte-order mark, then the HTTP charset, then a `<meta charset>` or
`http-equiv="Content-Type"` in the first 1,024 bytes, then detection (charset-normalizer).

Only the HTTP header used to count: a Latin-1 page titled "Café crème" was stored as
"Caf� cr�me", and a UTF-16 page with a BOM as markup.
"""

from __future__ import annotations

import codecs
import re

from charset_normalizer import from_bytes

PRESCAN_BYTES = 1024  # where the HTML standard looks for a <meta> declaration
DETECT_BYTES = 64 * 1024  # enough for detection; the whole page would cost more for nothing
FALLBACK = "utf-8"

_BOMS = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_META_CHARSET = re.compile(
    rb"""<meta[^>]+?charset\s*=\s*["']?\s*([a-zA-Z0-9_:.+-]+)""", re.IGNORECASE
)
# Labels browsers read as windows-1252, which differs from Latin-1 in 0x80-0x9F (curly quotes,
# the euro sign): pages that say iso-8859-1 almost always mean it.
_AS_WINDOWS_1252 = frozenset({"latin-1", "iso8859-1", "ascii"})


def sniff_encoding(body: bytes, http_charset: str | None) -> str:
    """The Python codec to decode `body` with."""
    for bom, name in _BOMS:
        if body.startswith(bom):
            return name
    declared = _codec(http_charset)
    if declared is None:
        found = _META_CHARSET.search(body[:PRESCAN_BYTES])
        declared = _codec(found.group(1).decode("ascii")) if found else None
        if declared is not None and declared.startswith("utf-16"):
            declared = "utf-8"  # a <meta> read as ASCII cannot be UTF-16 (the standard's rule)
    if declared is not None:
        return "cp1252" if declared in _AS_WINDOWS_1252 else declared
    best = from_bytes(body[:DETECT_BYTES]).best()
    return (_codec(best.encoding) if best is not None else None) or FALLBACK


def decode_page(body: bytes, http_charset: str | None) -> tuple[str, str]:
    """The page's text and the encoding it was read with; bytes that are not valid in that
    encoding become U+FFFD, never an error."""
    encoding = sniff_encoding(body, http_charset)
    bom = next((b for b, name in _BOMS if name == encoding and body.startswith(b)), b"")
    return body[len(bom) :].decode(encoding, errors="replace"), encoding


def _codec(label: str | None) -> str | None:
    if not label:
        return None
    try:
        return codecs.lookup(label.strip()).name
    except LookupError:
        return None
